"""clip-prep shard --distributor ray on a real local Ray cluster (two worker processes): the output
equals the local distributor's byte for byte (but the stats' timing), also when a worker is killed
mid-task (Ray re-runs its shard), when the job runs on a cluster it joins with --ray-address, and
when a killed job of either distributor is resumed with the other."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from prep_fixtures import jpeg_bytes, output_files, read_json, run_cli

pytest.importorskip("ray")

ROWS = 60
PER_SHARD = 10
HELD_ROW = 25  # its download waits HOLD_S: the moment to kill the worker holding it
HOLD_S = 2.0
RAY = Path(sys.executable).with_name("ray")
held = threading.Event()


class Images(BaseHTTPRequestHandler):
    """/img/N: a distinct JPEG after 20 ms (so that a job is still running when it is killed);
    /hold/N: the same after HOLD_S; /gone/N: 404."""

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802
        kind, number = self.path.split("/")[1], int(self.path.rsplit("/", 1)[1])
        if kind == "hold":
            held.set()
        time.sleep(HOLD_S if kind == "hold" else 0.02)
        body = b"gone" if kind == "gone" else jpeg_bytes(32, 24, seed=number)
        self.send_response(404 if kind == "gone" else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Images)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"

    def url(i):
        return f"{base}/{'hold' if i == HELD_ROW else 'gone' if i % 7 == 3 else 'img'}/{i}"

    path = tmp_path_factory.mktemp("table") / "urls.jsonl"
    path.write_text("".join(json.dumps({"url": url(i), "caption": f"caption {i}", "rank": i}) + "\n"
                            for i in range(ROWS)))
    yield path
    httpd.shutdown()


def command(table, out, *extra):
    return [sys.executable, "-m", "data_prep.cli", "shard", str(table), "--out", str(out), "--url-column", "url",
            "--samples-per-shard", str(PER_SHARD), "--workers", "2", "--threads", "2",
            "--save-additional-columns", "rank", *extra]


@pytest.fixture(scope="module")
def reference(table, tmp_path_factory):
    """The local distributor's output, which every Ray run must equal."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert run_cli(*command(table, out)[3:]) == 0
    return output_files(out)


def ray_env():
    """No usage report, and every Ray address on the loopback interface: on Linux Ray otherwise
    replaces 127.0.0.1 by the machine's outward address (this switch is its single-machine mode)."""
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def task_pids() -> list[int]:
    """Ray worker processes running a prep_shard task (Ray names the process after its task)."""
    ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in ps.splitlines() if "ray::prep_shard" in line]


def test_a_worker_killed_mid_task_is_retried_and_the_output_equals_the_local_one(tmp_path, table, reference):
    held.clear()
    out = tmp_path / "out"
    job = subprocess.Popen(command(table, out, "--distributor", "ray"), env=ray_env(), text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert held.wait(120), "the held row was never requested"
    killed = task_pids()
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    stdout, stderr = job.communicate(timeout=300)
    assert killed, "no prep_shard task was running while its row was held"
    assert job.returncode == 0, stderr
    assert "60 inputs" in stdout
    assert output_files(out) == reference
    assert read_json(out / "manifest.json")["rejected_by_reason"] == {"http_status": 9}


def kill_after(cmd, out, shards_done: int, env=None):
    """Start `cmd`, SIGKILL it once `shards_done` shards are complete, and check it was unfinished."""
    job = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(out.glob("*_stats.json"))) < shards_done and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    assert not (out / "manifest.json").exists(), "the job finished before it could be killed"


def test_a_killed_ray_job_resumes_locally_and_a_killed_local_job_resumes_on_ray(tmp_path, table, reference):
    from_ray = tmp_path / "from-ray"
    kill_after(command(table, from_ray, "--distributor", "ray"), from_ray, 2, ray_env())
    resumed = subprocess.run(command(table, from_ray, "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "complete shard(s) kept" in resumed.stderr
    assert output_files(from_ray) == reference

    from_local = tmp_path / "from-local"
    kill_after(command(table, from_local, "--workers", "1", "--threads", "1"), from_local, 2)
    resumed = subprocess.run(command(table, from_local, "--resume", "--distributor", "ray"), env=ray_env(),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert output_files(from_local) == reference


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def ray_cluster():
    """A Ray head node on 127.0.0.1 with two CPUs, as `ray start` runs it on a cluster machine."""
    port = free_port()
    start = subprocess.run([str(RAY), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                            "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
                           env=ray_env(), capture_output=True, text=True)
    assert start.returncode == 0, start.stderr
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(RAY), "stop", "--force"], env=ray_env(), capture_output=True)


def test_a_job_joins_a_running_cluster_with_ray_address(tmp_path, table, reference, ray_cluster):
    out = tmp_path / "out"
    job = subprocess.run(command(table, out, "--distributor", "ray", "--ray-address", ray_cluster), env=ray_env(),
                         capture_output=True, text=True)
    assert job.returncode == 0, job.stderr
    assert output_files(out) == reference


def test_ray_address_without_the_ray_distributor_is_refused(tmp_path, table, capsys):
    assert run_cli(*command(table, tmp_path / "out", "--ray-address", "127.0.0.1:6379")[3:]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["clip-prep: error: --ray-address is for --distributor ray"]
    assert not (tmp_path / "out").exists()
