"""Media behind fsspec URLs: s3:// objects on a real S3 server (moto's, started by the test on
127.0.0.1) named by a table's --path-column or --url-column, and file:// URLs as img2dataset users
write them. A missing object is a rejection with its reason; the job goes on."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prep_fixtures import jpeg_bytes, output_files, read_json, read_rejects, read_shards, run_cli

s3fs = pytest.importorskip("s3fs")
MOTO_SERVER = Path(sys.executable).with_name("moto_server")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_env():
    """The environment under which boto (and so s3fs) talks to the local server with test keys."""
    if not MOTO_SERVER.is_file():
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    port = free_port()
    server = subprocess.Popen([str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}"}
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline and server.poll() is None, "moto_server did not start"
            time.sleep(0.2)
    yield env
    server.terminate()
    server.wait(10)


def test_s3_objects_named_by_a_table_are_read_and_a_missing_one_is_rejected(tmp_path, s3_env):
    store = s3fs.S3FileSystem(key="test", secret="test", client_kwargs={"endpoint_url": s3_env["AWS_ENDPOINT_URL_S3"]})
    store.mkdir("media")
    images = {f"s3://media/img{i}.jpg": jpeg_bytes(seed=i) for i in range(5)}
    for url, data in images.items():
        store.pipe(url, data)
    rows = [{"filepath": url, "caption": f"caption {i}", "rank": i} for i, url in enumerate(images)]
    rows.insert(2, {"filepath": "s3://media/missing.jpg", "caption": "gone", "rank": 99})
    table = tmp_path / "pairs.jsonl"
    table.write_text("".join(json.dumps(row) + "\n" for row in rows))
    for column_flag, out in (("--path-column", tmp_path / "by-path"), ("--url-column", tmp_path / "by-url")):
        job = subprocess.run([sys.executable, "-m", "data_prep.cli", "shard", str(table), "--out", str(out),
                              column_flag, "filepath", "--workers", "2", "--save-additional-columns", "rank"],
                             env={**os.environ, **s3_env}, capture_output=True, text=True)
        assert job.returncode == 0, job.stderr
        written = [json.loads(sample["json"]) for sample in read_shards(out).values()]
        assert [meta["url"] for meta in written] == list(images)
        assert [meta["sha256"] for meta in written] == [hashlib.sha256(data).hexdigest() for data in images.values()]
        assert [meta["rank"] for meta in written] == [0, 1, 2, 3, 4]
        assert [(r["url"], r["reason"]) for r in read_rejects(out)] == [("s3://media/missing.jpg", "missing_file")]
        assert read_json(out / "00000_stats.json")["failed_to_download"] == 1


def test_file_urls_as_img2dataset_users_write_them(tmp_path):
    paths = [tmp_path / f"img{i}.jpg" for i in range(3)]
    for i, path in enumerate(paths):
        path.write_bytes(jpeg_bytes(seed=i))
    urls = [path.as_uri() for path in paths] + [(tmp_path / "missing.jpg").as_uri()]
    table = tmp_path / "urls.jsonl"
    table.write_text("".join(json.dumps({"url": url, "caption": "c"}) + "\n" for url in urls))
    out = tmp_path / "out"
    assert run_cli("shard", table, "--out", out, "--url-column", "url", "--workers", 1) == 0
    assert [json.loads(s["json"])["url"] for s in read_shards(out).values()] == urls[:3]
    assert [r["reason"] for r in read_rejects(out)] == ["missing_file"]


def remote_files(store, folder: Path, prefix: str = "out/job") -> dict[str, bytes]:
    """A remote output's files, fetched into `folder`, as output_files gives them."""
    folder.mkdir()
    for path in store.ls(prefix, detail=False):
        store.get_file(path, str(folder / path.rsplit("/", 1)[1]))
    return output_files(folder)


def test_out_on_s3_equals_a_local_output_a_killed_job_resumes_there_and_ray_workers_write_there(tmp_path, s3_env):
    store = s3fs.S3FileSystem(key="test", secret="test", client_kwargs={"endpoint_url": s3_env["AWS_ENDPOINT_URL_S3"]})
    store.mkdir("out")
    rows = [{"filepath": str(tmp_path / f"img{i}.jpg"), "caption": f"caption {i}"} for i in range(60)]
    for i, row in enumerate(rows):
        Path(row["filepath"]).write_bytes(jpeg_bytes(seed=i) if i % 9 else b"broken")
    table = tmp_path / "pairs.jsonl"
    table.write_text("".join(json.dumps(row) + "\n" for row in rows))
    env = {**os.environ, **s3_env}

    def shard(out, *extra):
        return [sys.executable, "-m", "data_prep.cli", "shard", str(table), "--out", out, "--workers", "1",
                "--samples-per-shard", "4", *extra]

    assert subprocess.run(shard(str(tmp_path / "local")), capture_output=True).returncode == 0
    job = subprocess.Popen(shard("s3://out/job"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        store.invalidate_cache()
        if len(store.glob("out/job/*_stats.json")) >= 3:
            break
        time.sleep(0.05)
    job.kill()
    job.wait()
    assert not store.exists("out/job/manifest.json"), "the job finished before it could be killed"
    resumed = subprocess.run(shard("s3://out/job", "--resume"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "complete shard(s) kept" in resumed.stderr
    store.invalidate_cache()
    assert remote_files(store, tmp_path / "fetched") == output_files(tmp_path / "local")

    again = subprocess.run(shard("s3://out/job"), env=env, capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr and "--overwrite" in again.stderr

    pytest.importorskip("ray")
    on_ray = subprocess.run(shard("s3://out/ray", "--distributor", "ray", "--workers", "2"), capture_output=True,
                            text=True, env={**env, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    assert on_ray.returncode == 0, on_ray.stderr
    store.invalidate_cache()
    assert remote_files(store, tmp_path / "fetched-ray", "out/ray") == output_files(tmp_path / "local")
