"""clip-prep shard --url-column against a real HTTP server on 127.0.0.1, started by the test: good
images, HTTP errors, a response slower than the timeout, a reset connection, a truncated body,
redirect chains and loops, HTML, an oversized body, an opt-out header and a flaky 503. Every row
ends written or rejected with the right reason, and the job finishes."""
from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from prep_fixtures import jpeg_bytes, read_json, read_rejects, read_shards, run_cli

IMAGE = jpeg_bytes(40, 30, seed=3)
FLAKY_HITS: dict[str, int] = {}


class Handler(BaseHTTPRequestHandler):
    """Each path is one behaviour; /img/N serves a distinct JPEG."""

    def log_message(self, *args):  # keep the test output clean
        pass

    def _send(self, status, body=b"", content_type="image/jpeg", headers=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 - http.server's name
        path = self.path
        if path.startswith("/img/"):
            return self._send(200, jpeg_bytes(40, 30, seed=int(path.rsplit("/", 1)[1])))
        if path == "/404":
            return self._send(404, b"not here", "text/plain")
        if path == "/500":
            return self._send(500, b"broken", "text/plain")
        if path == "/slow":
            time.sleep(3)
            return self._send(200, IMAGE)
        if path == "/reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            self.connection.close()  # RST: the client sees a reset connection
            return None
        if path == "/truncated":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(IMAGE)))
            self.end_headers()
            self.wfile.write(IMAGE[: len(IMAGE) // 2])
            self.close_connection = True
            return None
        if path.startswith("/chain/"):
            left = int(path.rsplit("/", 1)[1])
            return self._send(302, headers=[("Location", f"/chain/{left - 1}" if left else "/img/7")])
        if path == "/loop":
            return self._send(302, headers=[("Location", "/loop")])
        if path == "/html":
            return self._send(200, b"<html><body>an error page</body></html>", "text/html")
        if path == "/huge":
            return self._send(200, b"\xff" * 300_000)
        if path == "/optout":
            return self._send(200, IMAGE, headers=[("X-Robots-Tag", "noai, noimageai")])
        if path == "/flaky":
            FLAKY_HITS["n"] = FLAKY_HITS.get("n", 0) + 1
            return self._send(503, b"busy", "text/plain") if FLAKY_HITS["n"] == 1 else self._send(200, IMAGE)
        return self._send(404, b"?", "text/plain")


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


# path -> the reason it is rejected with (None: written)
CASES = {
    "/img/1": None, "/img/2": None, "/chain/3": None, "/flaky": None,
    "/404": "http_status", "/500": "http_status", "/slow": "read_timeout", "/reset": "connection_error",
    "/truncated": "truncated_download", "/loop": "too_many_redirects", "/html": "not_an_image",
    "/huge": "too_large", "/optout": "opted_out",
}


def write_table(tmp_path, base):
    rows = [{"url": base + path, "caption": f"row {i}", "rank": i} for i, path in enumerate(CASES)]
    rows.append({"url": "nope://127.0.0.1/x.jpg", "caption": "no such protocol", "rank": len(rows)})
    rows.append({"url": "http://127.0.0.1:1/refused.jpg", "caption": "nobody listens", "rank": len(rows)})
    table = tmp_path / "urls.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return table, rows


@pytest.mark.parametrize("workers", [1, 2])
def test_every_url_is_written_or_rejected_with_its_reason(tmp_path, server, workers):
    FLAKY_HITS.clear()
    table, rows = write_table(tmp_path, server)
    out = tmp_path / "out"
    assert run_cli("shard", table, "--out", out, "--url-column", "url", "--timeout", "1", "--retries", "1",
                   "--max-download-bytes", "200000", "--threads", "4", "--workers", workers,
                   "--save-additional-columns", "rank") == 0
    written = {json.loads(s["json"])["url"]: json.loads(s["json"]) for s in read_shards(out).values()}
    expected_written = [server + p for p, reason in CASES.items() if reason is None]
    assert sorted(written) == sorted(expected_written)
    assert all(meta["source"] == url and isinstance(meta["rank"], int) for url, meta in written.items())
    rejected = {r["url"]: r["reason"] for r in read_rejects(out)}
    expected = {server + p: reason for p, reason in CASES.items() if reason is not None}
    expected.update({"nope://127.0.0.1/x.jpg": "invalid_url", "http://127.0.0.1:1/refused.jpg": "connection_error"})
    assert rejected == expected
    manifest = read_json(out / "manifest.json")
    assert manifest["written"] + manifest["rejected"] == len(rows)
    stats = [read_json(path) for path in sorted(out.glob("*_stats.json"))]  # img2dataset's split of failures
    assert sum(s["failed_to_resize"] for s in stats) == 1  # the HTML page: it arrived, it is not an image
    assert sum(s["failed_to_download"] for s in stats) == len(expected) - 1
    assert sum(s["successes"] for s in stats) == len(expected_written)


def test_opt_out_can_be_ignored_and_retries_are_needed_for_a_flaky_server(tmp_path, server):
    FLAKY_HITS.clear()
    table = tmp_path / "urls.jsonl"
    table.write_text("".join(json.dumps({"url": server + p, "caption": "x"}) + "\n" for p in ("/optout", "/flaky")))
    out = tmp_path / "out"
    assert run_cli("shard", table, "--out", out, "--url-column", "url", "--ignore-opt-out", "--workers", 1) == 0
    assert [json.loads(s["json"])["url"] for s in read_shards(out).values()] == [server + "/optout"]
    assert [r["reason"] for r in read_rejects(out)] == ["http_status"]  # the 503, without --retries


def test_a_missing_url_column_is_one_line(tmp_path, capsys):
    table = tmp_path / "urls.jsonl"
    table.write_text(json.dumps({"link": "http://127.0.0.1/x.jpg", "caption": "x"}) + "\n")
    assert run_cli("shard", table, "--out", tmp_path / "out", "--url-column", "url") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'url' (from --url-column) not found" in err


def test_failures_the_loopback_server_cannot_stage_are_named_too():
    """DNS failures and connect timeouts need the outside network; their classification is
    checked on the errors requests raises for them."""
    import requests

    from data_prep.download import _classify, opted_out

    dns = requests.exceptions.ConnectionError("HTTPConnectionPool(host='x.invalid'): NameResolutionError(...)")
    assert _classify(dns).reason == "dns_error"
    assert _classify(requests.exceptions.ConnectTimeout("timed out")).reason == "connect_timeout"
    assert opted_out({"X-Robots-Tag": "otherbot: noai"}) is None  # scoped to another agent
    assert opted_out({"X-Robots-Tag": "*: noimageai"}) == "noimageai"
