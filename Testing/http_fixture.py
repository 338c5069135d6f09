"""A real HTTP server on 127.0.0.1 for download tests, with switchable faults.

Paths: ``/ok/NAME`` serves with Range support; ``/drop-once/NAME`` closes the connection half-way
through the first response; ``/norange/NAME`` ignores Range headers; ``/slow/NAME`` stalls before the
body; ``/loop/...`` redirects to itself forever; anything else is 404. ``server.requests`` records
(path, Range header) pairs.
"""

from __future__ import annotations

import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FaultyFileServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, files: dict[str, bytes], stall_s: float = 3.0):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files = files
        self.stall_s = stall_s
        self.requests: list[tuple[str, str | None]] = []
        self.dropped: set[str] = set()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: FaultyFileServer

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        srv = self.server
        range_header = self.headers.get("Range")
        srv.requests.append((self.path, range_header))
        if self.path.startswith("/loop/"):  # a redirect to itself, forever
            self.send_response(302)
            self.send_header("Location", self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        match = re.fullmatch(r"/(ok|drop-once|norange|slow)/(.+)", self.path)
        if not match or match.group(2) not in srv.files:
            self.send_error(404, "Not Found")
            return
        mode, name = match.groups()
        data = srv.files[name]
        start = 0
        if range_header and mode != "norange":
            start = int(re.fullmatch(r"bytes=(\d+)-", range_header).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if mode == "slow":
            time.sleep(srv.stall_s)
        if mode == "drop-once" and name not in srv.dropped:
            srv.dropped.add(name)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.wfile.write(body)
