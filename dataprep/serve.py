"""A loopback HTTP server for a folder, with optional faults for tests and demos.

The real download stages (img2dataset, the video stage) run against it exactly as they
would against the internet; nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Faults:
    """What the server does wrong, keyed by URL path (e.g. "/images/a.jpg")."""

    status: dict[str, int] = field(default_factory=dict)  # answer with this HTTP status
    payload: dict[str, bytes] = field(default_factory=dict)  # answer 200 with these bytes
    truncate: set[str] = field(default_factory=set)  # announce the full length, send half
    delay_s: float = 0.0  # added to every request, to make runs slow enough to interrupt


class _Handler(SimpleHTTPRequestHandler):
    faults: Faults

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass  # a test run downloads hundreds of files; the access log is noise

    def do_GET(self):
        if self.faults.delay_s:
            time.sleep(self.faults.delay_s)
        path = self.path.split("?", 1)[0]
        if path in self.faults.status:
            self.send_error(self.faults.status[path])
            return
        if path in self.faults.payload:
            body = self.faults.payload[path]
            self.send_response(200)
            # Servers that lie about the content type are the case worth testing.
            self.send_header("Content-Type", self.guess_type(path))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if path in self.faults.truncate:
            local = Path(self.translate_path(path))
            body = local.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", self.guess_type(path))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        super().do_GET()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A client that hangs up early (a killed downloader, a timeout) is normal here.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class LoopbackServer:
    """Serve `root` on 127.0.0.1 at a free port, in a background thread.

    Use as a context manager: `with LoopbackServer(folder) as srv: srv.url + "/a.jpg"`.
    """

    def __init__(self, root: str | Path, faults: Faults | None = None, port: int = 0):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"cannot serve {self.root}: not a folder")
        self.faults = faults or Faults()
        handler = type("Handler", (_Handler,), {"faults": self.faults})
        self._httpd = _Server(("127.0.0.1", port), functools.partial(handler, directory=str(self.root)))
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "LoopbackServer":
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> "LoopbackServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_forever(root: str | Path, port: int = 0) -> None:
    """Serve a folder until interrupted (the CLI's `serve` stage)."""
    with LoopbackServer(root, port=port) as srv:
        print(f"serving {srv.root} at {srv.url} (Ctrl-C stops)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
