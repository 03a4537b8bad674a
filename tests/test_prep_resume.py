"""clip-prep shard --resume: a job killed with SIGKILL part way and started again with the same
command ends with the shards, rejects and accounting of an uninterrupted run; a finished job is
left alone; a changed command or a non-empty output without --resume/--overwrite is refused."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from prep_fixtures import jpeg_bytes, output_files, read_json, run_cli

ROWS = 120


class SlowImages(BaseHTTPRequestHandler):
    """/img/N: a distinct JPEG after 25 ms (so that a job is still running when it is killed);
    /gone/N: 404."""

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802
        time.sleep(0.025)
        number = int(self.path.rsplit("/", 1)[1])
        body = jpeg_bytes(32, 24, seed=number) if self.path.startswith("/img/") else b"gone"
        self.send_response(200 if self.path.startswith("/img/") else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), SlowImages)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    path = tmp_path_factory.mktemp("table") / "urls.jsonl"
    rows = [{"url": f"{base}/{'gone' if i % 7 == 3 else 'img'}/{i}", "caption": f"caption {i}"} for i in range(ROWS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    yield path
    httpd.shutdown()


def command(table, out, *extra):
    return [sys.executable, "-m", "data_prep.cli", "shard", str(table), "--out", str(out), "--url-column", "url",
            "--samples-per-shard", "10", "--workers", "1", "--threads", "1", *extra]


def outputs(out):
    """Everything but the timestamps: shard bytes, parquets, stats, sizes, rejects, counts."""
    files = output_files(out)
    manifest = read_json(out / "manifest.json")
    return files, {k: manifest[k] for k in ("inputs", "written", "rejected", "rejected_by_reason", "shards")}


def test_a_killed_job_resumes_to_the_uninterrupted_output(tmp_path, table):
    reference = tmp_path / "reference"
    assert subprocess.run(command(table, reference), capture_output=True).returncode == 0
    out = tmp_path / "out"
    job = subprocess.Popen(command(table, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (out / "00003_stats.json").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    assert not (out / "manifest.json").exists(), "the job finished before it could be killed"
    # the same command with --resume; workers and threads may differ, they do not shape the output
    resumed = subprocess.run(command(table, out, "--resume", "--threads", "4"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "complete shard(s) kept" in resumed.stderr
    assert outputs(out) == outputs(reference)
    manifest = read_json(out / "manifest.json")
    assert manifest["written"] + manifest["rejected"] == ROWS and manifest["rejected_by_reason"] == {"http_status": 17}
    keys = [line for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 17


def test_resume_of_a_finished_job_does_nothing(tmp_path, table, capsys):
    out = tmp_path / "out"
    assert run_cli(*command(table, out)[3:]) == 0
    before = outputs(out)
    capsys.readouterr()
    assert run_cli(*command(table, out, "--resume")[3:]) == 0
    assert "already complete" in capsys.readouterr().out and outputs(out) == before


def test_a_changed_command_or_a_missing_flag_is_refused(tmp_path, table, capsys):
    out = tmp_path / "out"
    assert run_cli(*command(table, out)[3:]) == 0
    (out / "manifest.json").unlink()  # as if unfinished
    assert run_cli(*command(table, out, "--resume", "--image-size", "128")[3:]) == 2
    assert "options image_size differ" in capsys.readouterr().err
    assert run_cli(*command(table, out)[3:]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resume" in err and "--overwrite" in err
