"""A real HTTP file server on 127.0.0.1 for tests: Range requests, faults, a request log.

    with FileServer() as server:                       # a free port, threads, daemon
        server.add("/data/a.bin", data)                # serve bytes at a path
        server.add("/data/b.bin", data, fail_first=2)  # 500 to the first 2 requests
        server.add("/data/c.bin", data, cut_after=1000)  # first response stops after 1000 bytes
        server.add("/data/d.bin", data, rate=256_000)  # about 256 KB/s, so a kill lands mid-transfer
        server.update("/data/d.bin", rate=None)        # change a fault while the server runs
        server.url("/data/a.bin")                      # http://127.0.0.1:<port>/data/a.bin
        server.requests_for("/data/c.bin")             # [Request(method, path, range_start, ...)]

Behaviour a client sees:
- GET and HEAD; unknown paths answer 404; `Range: bytes=N-` / `bytes=N-M` answer 206 with
  Content-Range, a range starting at or past the end answers 416 (`ranges=False`: a server
  that ignores Range and sends everything with 200).
- Content-Length is always the full length of what the response promises, so a cut
  response is a short body the client can detect (requests raises ChunkedEncodingError).
- `add_hf(repo, filename, data)` serves a file the way the Hugging Face hub's
  `/{type}s/{repo}/resolve/{revision}/{filename}` endpoint does (X-Repo-Commit, ETag,
  X-Linked-Size) and lists it in `/api/{type}s/{repo}/tree/{revision}` (one page, JSON),
  so `HF_ENDPOINT=server.base` makes huggingface_hub download and list files from here.

Every request is logged (method, path, Range start, status, body bytes sent, headers)
before it is answered. Handler sockets time out after 30 s, so no wait is unbounded.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")
_BLOCK = 16 * 1024  # bytes per write when throttled or cut


@dataclass
class Served:
    """One path's content and faults (counters count requests to this path)."""

    data: bytes
    headers: dict[str, str] = field(default_factory=dict)
    fail_first: int = 0  # answer `fail_status` to the first N requests
    fail_status: int = 500
    cut_after: int | None = None  # send at most this many body bytes, then close the connection
    cuts: int = 1  # ... for this many (non-failed) responses
    rate: float | None = None  # body bytes per second (None: as fast as possible)
    ranges: bool = True  # False: ignore Range headers and always answer 200 with everything
    seen: int = 0
    cut_done: int = 0


@dataclass
class Request:
    method: str
    path: str
    range_start: int | None  # None: no Range header
    headers: dict[str, str]  # names in lower case, e.g. headers["authorization"]
    status: int = 0
    sent: int = 0  # body bytes actually written


class FileServer:
    def __init__(self) -> None:
        self.files: dict[str, Served] = {}
        self.trees: dict[str, list[dict]] = {}  # hub tree path -> its file entries
        self.requests: list[Request] = []
        self.lock = threading.Lock()
        self.httpd: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    # -- content -------------------------------------------------------------------------
    def add(self, path: str, data: bytes, **faults) -> str:
        with self.lock:
            self.files[path] = Served(data=data, **faults)
        return self.url(path)

    def update(self, path: str, **changes) -> None:
        with self.lock:
            served = self.files[path]
            for name, value in changes.items():
                setattr(served, name, value)

    def add_hf(self, repo: str, filename: str, data: bytes, repo_type: str = "dataset",
               revision: str = "main", commit: str = "0123456789abcdef0123456789abcdef01234567") -> str:
        """Serve `data` where huggingface_hub resolves repo/filename (HF_ENDPOINT=self.base)."""
        prefix = "" if repo_type == "model" else f"/{repo_type}s"
        path = f"{prefix}/{repo}/resolve/{revision}/{filename}"
        etag = hashlib.sha256(data).hexdigest()
        headers = {"X-Repo-Commit": commit, "ETag": f'"{etag}"', "X-Linked-Size": str(len(data))}
        tree = f"/api/{repo_type}s/{repo}/tree/{revision}"
        entries = self.trees.setdefault(tree, [])
        entries.append({"type": "file", "path": filename, "size": len(data), "oid": hashlib.sha1(data).hexdigest()})
        self.add(tree, json.dumps(entries).encode(), headers={"Content-Type": "application/json"})
        return self.add(path, data, headers=headers)

    # -- addresses and the log ----------------------------------------------------------
    @property
    def base(self) -> str:
        assert self.httpd is not None, "start() the server first"
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base + path

    def requests_for(self, path: str, method: str = "GET") -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.path == path and r.method == method]

    def clear_log(self) -> None:
        with self.lock:
            self.requests.clear()

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> "FileServer":
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
        if self.thread is not None:
            self.thread.join(timeout=10)

    def __enter__(self) -> "FileServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _handler_for(server: FileServer):
    class Handler(BaseHTTPRequestHandler):
        timeout = 30  # socket timeout: a stuck client cannot hold a thread forever

        def log_message(self, format, *args):  # noqa: A002 - keep test output quiet
            pass

        def do_HEAD(self):
            self._answer(body=False)

        def do_GET(self):
            self._answer(body=True)

        def _answer(self, body: bool) -> None:
            path = self.path.split("?", 1)[0]
            wanted = self.headers.get("Range")
            match = _RANGE.match(wanted.strip()) if wanted else None
            record = Request(self.command, path, int(match.group(1)) if match else None,
                             {name.lower(): value for name, value in self.headers.items()})
            with server.lock:
                server.requests.append(record)
                served = server.files.get(path)
                if served is not None:
                    served.seen += 1
                    failing = served.seen <= served.fail_first
                    cut = None
                    if not failing and body and served.cut_after is not None and served.cut_done < served.cuts:
                        served.cut_done += 1
                        cut = served.cut_after
                    data, rate, extra = served.data, served.rate, dict(served.headers)
                    if not served.ranges:
                        match = None
            if served is None:
                return self._status(record, 404, b"not found\n")
            if failing:
                return self._status(record, served.fail_status, b"injected failure\n")
            start, end = 0, len(data)
            status = 200
            if match:
                start = int(match.group(1))
                if match.group(2):
                    end = min(end, int(match.group(2)) + 1)
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    record.status = 416
                    return
                status = 206
            self.send_response(status)
            self.send_header("Content-Length", str(end - start))
            if served.ranges:
                self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            for name, value in extra.items():
                self.send_header(name, value)
            self.end_headers()
            record.status = status
            if not body:
                return
            stop = end if cut is None else min(end, start + cut)
            try:
                self._send(record, data, start, stop, rate)
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                pass  # the client went away (killed): what was sent is in record.sent
            if cut is not None:
                self.close_connection = True

        def _send(self, record: Request, data: bytes, start: int, stop: int, rate: float | None) -> None:
            position = start
            began = time.monotonic()
            while position < stop:
                block = data[position : min(stop, position + _BLOCK)]
                self.wfile.write(block)
                position += len(block)
                record.sent += len(block)
                if rate:
                    # Sleep until the bytes sent so far match the rate (re-read: update() may lift it).
                    current = server.files.get(record.path)
                    rate = current.rate if current is not None else rate
                    if rate:
                        ahead = record.sent / rate - (time.monotonic() - began)
                        if ahead > 0:
                            time.sleep(min(ahead, 1.0))
            self.wfile.flush()

        def _status(self, record: Request, code: int, text: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(text)
            record.status = code

    return Handler
