"""Fetching remote media for `clip-prep shard`: one HTTP(S) GET per input, with a
timeout, retries with backoff, a redirect limit, a size limit, a user agent, and the publishers'
opt-out headers respected (as img2dataset does by default).

Every failure is a `Rejection` with a reason of its own (dns_error, connect_timeout, read_timeout,
connection_error, http_status, too_many_redirects, too_large, truncated_download, opted_out), so
that a dead link costs one line in rejects.jsonl, never the job. Other URLs (s3://, gs://, file://,
any protocol fsspec knows) are read through fsspec.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from data_prep.samples import Rejection

# X-Robots-Tag directives that opt an image out of AI datasets (img2dataset's default list).
OPT_OUT_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")
USER_AGENT = "clip-prep/0.1 (+https://github.com/; image-text dataset preparation)"
RETRYABLE = ("dns_error", "connect_timeout", "read_timeout", "connection_error", "truncated_download")
# Every reason a download can fail with: img2dataset counts these as "failed_to_download".
DOWNLOAD_REASONS = frozenset(RETRYABLE + ("http_status", "too_many_redirects", "too_large", "opted_out", "invalid_url",
                                          "missing_url", "download_error", "missing_file", "unsupported_url"))
CHUNK_BYTES = 64 * 1024

_local = threading.local()  # one requests.Session per thread: sessions are not thread-safe


@dataclass(frozen=True)
class DownloadOptions:
    """Plain data, so that it pickles into worker processes."""

    timeout: float = 10.0
    retries: int = 0
    max_redirects: int = 10
    max_bytes: int = 50 * 1024 * 1024
    user_agent: str = USER_AGENT
    respect_opt_out: bool = True
    backoff_s: float = 0.5  # wait before retry k: backoff_s * 2**k


def _session():
    import requests

    if getattr(_local, "session", None) is None:
        _local.session = requests.Session()
    return _local.session


def opted_out(headers) -> str | None:
    """The opt-out directive of an X-Robots-Tag header, if any. A directive may be scoped to a user
    agent ("otherbot: noai"); only unscoped ones and those for every agent count, as img2dataset reads them."""
    for value in headers.get("X-Robots-Tag", "").split(","):
        directive = value.strip().lower()
        if ":" in directive:
            agent, directive = (part.strip() for part in directive.split(":", 1))
            if agent not in ("*", "clip-prep"):
                continue
        if directive in OPT_OUT_DIRECTIVES:
            return directive
    return None


def _classify(error: Exception) -> Rejection:
    import requests

    text = f"{type(error).__name__}: {error}"
    if isinstance(error, requests.exceptions.TooManyRedirects):
        return Rejection("too_many_redirects", text)
    if isinstance(error, requests.exceptions.ConnectTimeout):
        return Rejection("connect_timeout", text)
    if isinstance(error, (requests.exceptions.ReadTimeout, TimeoutError)):
        return Rejection("read_timeout", text)
    if isinstance(error, requests.exceptions.ChunkedEncodingError):
        return Rejection("truncated_download", text)
    if isinstance(error, requests.exceptions.ConnectionError):
        resolution = any(s in str(error) for s in ("NameResolution", "Name or service not known", "nodename"))
        return Rejection("dns_error" if resolution else "connection_error", text)
    if isinstance(error, requests.exceptions.InvalidURL) or isinstance(error, requests.exceptions.MissingSchema):
        return Rejection("invalid_url", text)
    return Rejection("download_error", text)


def _read_body(response, options: DownloadOptions) -> bytes | Rejection:
    declared = response.headers.get("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) > options.max_bytes:
        return Rejection("too_large", f"Content-Length {declared} over the {options.max_bytes}-byte limit")
    body = bytearray()
    deadline = time.monotonic() + 4 * options.timeout  # a trickling server cannot hold a thread forever
    for chunk in response.iter_content(CHUNK_BYTES):
        body += chunk
        if len(body) > options.max_bytes:
            return Rejection("too_large", f"body over the {options.max_bytes}-byte limit")
        if time.monotonic() > deadline:
            return Rejection("read_timeout", f"body not received within {4 * options.timeout:g} s")
    if declared is not None and declared.isdigit() and len(body) < int(declared):
        return Rejection("truncated_download", f"{len(body)} of {declared} bytes received")
    return bytes(body)


def _fetch_once(url: str, options: DownloadOptions) -> bytes | Rejection:
    session = _session()
    session.max_redirects = options.max_redirects
    try:
        with session.get(url, timeout=options.timeout, stream=True, allow_redirects=True,
                         headers={"User-Agent": options.user_agent}) as response:
            if response.status_code >= 400:
                return Rejection("http_status", f"HTTP {response.status_code} {response.reason}")
            directive = opted_out(response.headers) if options.respect_opt_out else None
            if directive is not None:
                return Rejection("opted_out", f"X-Robots-Tag: {directive}")
            return _read_body(response, options)
    except Exception as error:  # every network failure becomes a reason, never a crash
        return _classify(error)


def _retryable(rejection: Rejection) -> bool:
    return rejection.reason in RETRYABLE or (rejection.reason == "http_status" and rejection.detail.startswith("HTTP 5"))


def download(url: str, options: DownloadOptions) -> bytes | Rejection:
    """The body of `url`, or why not; transient failures (timeouts, resets, 5xx) are retried
    `options.retries` times with exponential backoff."""
    result = _fetch_once(url, options)
    for attempt in range(options.retries):
        if not (isinstance(result, Rejection) and _retryable(result)):
            break
        time.sleep(options.backoff_s * 2**attempt)
        result = _fetch_once(url, options)
    return result


def is_http(url: str) -> bool:
    return url.lower().startswith(("http://", "https://"))


def read_with_fsspec(url: str, max_bytes: int) -> bytes | Rejection:
    """The bytes behind an fsspec URL (s3://, gs://, file://, ...); the protocol's package (s3fs,
    gcsfs) must be installed, and its credentials are read the usual way (environment, config files)."""
    import fsspec

    try:
        with fsspec.open(url, "rb") as media:
            data = media.read(max_bytes + 1)
    except FileNotFoundError:
        return Rejection("missing_file", f"no such object: {url}")
    except ImportError as error:  # fsspec knows the protocol but its package is not installed
        return Rejection("unsupported_url", f"{url}: {error}")
    except Exception as error:  # a remote store's failure is this input's, not the job's
        return Rejection("download_error", f"{type(error).__name__}: {error}")
    if len(data) > max_bytes:
        return Rejection("too_large", f"object over the {max_bytes}-byte limit")
    return data


def fetch(url: str, options: DownloadOptions) -> bytes | Rejection:
    """An input's media from its URL: HTTP(S) with `download`, anything else through fsspec."""
    return download(url, options) if is_http(url) else read_with_fsspec(url, options.max_bytes)
