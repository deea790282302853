"""A real HTTP server on 127.0.0.1 for image-fetch tests: static files plus the misbehaving answers a
fetcher must survive (redirects to other paths, to file:// and in a loop, 404, slow and trickling
answers, oversized bodies with and without Content-Length)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ImageServer:
    """`with ImageServer({"/a.png": data}) as server: server.url("/a.png")`."""

    def __init__(self, files: dict[str, bytes], oversized_bytes: int = 4096) -> None:
        self.files = files
        self.oversized_bytes = oversized_bytes
        self.release = threading.Event()  # ends slow answers when the server stops
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                server._answer(self)

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def handle(self) -> None:
                try:
                    super().handle()
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeouts): expected
                    pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> "ImageServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def _answer(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path
        if path in self.files:
            return _send(h, 200, self.files[path])
        if path == "/redirect":  # relative Location, to another http path
            return _send(h, 302, b"", location="/img.png")
        if path == "/redirect-twice":
            return _send(h, 301, b"", location=self.url("/redirect"))
        if path == "/redirect-loop":
            return _send(h, 302, b"", location="/redirect-loop")
        if path == "/redirect-file":
            return _send(h, 302, b"", location="file:///etc/passwd")
        if path == "/redirect-ftp":
            return _send(h, 307, b"", location="ftp://127.0.0.1/img.png")
        if path == "/slow":  # no answer until the client has long given up
            self.release.wait(5)
            return _send(h, 200, self.files.get("/img.png", b""))
        if path == "/trickle":  # headers at once, then a byte every 50 ms: no single read times out
            h.send_response(200)
            h.send_header("Content-Length", "200")
            h.end_headers()
            for _ in range(200):
                if self.release.wait(0.05):
                    return
                h.wfile.write(b"x")
                h.wfile.flush()
            return
        if path == "/big":  # Content-Length over the cap
            return _send(h, 200, b"\0" * self.oversized_bytes)
        if path == "/big-unsized":  # no Content-Length (HTTP/1.0, body ends at close): only counting finds it
            h.send_response(200)
            h.end_headers()
            for _ in range(self.oversized_bytes // 256 + 1):
                h.wfile.write(b"\0" * 256)
            return
        if path == "/text":
            return _send(h, 200, b"<html><body>not an image</body></html>", content_type="text/html")
        if path == "/empty":
            return _send(h, 200, b"")
        if path == "/error":
            return _send(h, 500, b"boom")
        return _send(h, 404, b"not found")


def _send(h: BaseHTTPRequestHandler, status: int, body: bytes, location: str | None = None,
          content_type: str = "application/octet-stream") -> None:
    h.send_response(status)
    if location is not None:
        h.send_header("Location", location)
    h.send_header("Content-Type", content_type)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


def free_port() -> int:
    """A port nothing listens on (bound, then closed): connections to it are refused."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


__all__ = ["ImageServer", "free_port"]
