"""A local http server that counts the bytes it sends: the I/O benchmark and the loader tests
measure reads where a real deployment pays for them, at the server (loopback only)."""

from __future__ import annotations

from pathlib import Path


class CountingServer:
    """A local http server over a folder that counts the bytes of every body it sends, per path.

    ``ranges``: answer ``Range: bytes=a-b`` with 206 (else the whole file, as
    ``python -m http.server`` does); ``cut``: path -> n, the first answer for that path stops after
    ``n`` body bytes (a dropped connection).
    """

    def __init__(self, root: Path, ranges: bool = True) -> None:
        import http.server
        import threading

        self.root, self.ranges = root, ranges
        self.sent: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.cut: dict[str, int] = {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                rng = self.headers.get("Range")
                server.requests.append((path, rng))
                f = server.root / path.lstrip("/")
                if not f.is_file():
                    self.send_error(404)
                    return
                data = f.read_bytes()
                if rng and server.ranges:
                    a, b = (int(x) for x in rng.split("=", 1)[1].split("-"))
                    body = data[a:b + 1]
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {a}-{a + len(body) - 1}/{len(data)}")
                else:
                    body = data
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if path in server.cut:
                    body = body[:server.cut.pop(path)]
                    self.close_connection = True
                self.wfile.write(body)
                server.sent[path] = server.sent.get(path, 0) + len(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def shard_bytes(self) -> int:
        """Bytes of ``.tar`` bodies sent so far."""
        return sum(n for p, n in self.sent.items() if p.endswith(".tar"))

    def __enter__(self) -> CountingServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
