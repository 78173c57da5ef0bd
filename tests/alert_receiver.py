"""A local webhook receiver on loopback that records what alerts post to it."""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class AlertReceiver:
    """`status`: what it answers (e.g. 500 to make the sender retry). `posts`: (path, JSON body) received."""

    def __init__(self, status: int = 200):
        self.status = status
        self.posts: list[tuple[str, dict]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver._lock:
                    receiver.posts.append((self.path, json.loads(body)))
                self.send_response(receiver.status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def bodies(self, event: str | None = None) -> list[dict]:
        with self._lock:
            return [b for _, b in self.posts if event is None or b.get("event") == event]

    def wait(self, n: int, timeout: float = 10.0, event: str | None = None) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.bodies(event)) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.bodies(event)

    def __enter__(self) -> "AlertReceiver":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


class Silent:
    """A loopback port that accepts connections (the kernel's backlog) and never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def accept(self, timeout: float = 10.0) -> socket.socket:
        """Wait for a sender to connect; the connection is kept open, unanswered."""
        self.sock.settimeout(timeout)
        conn, _ = self.sock.accept()
        self.held.append(conn)
        return conn

    def __enter__(self) -> "Silent":
        return self

    def __exit__(self, *exc) -> None:
        for conn in self.held:
            conn.close()
        self.sock.close()
