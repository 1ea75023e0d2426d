"""A remote reward server on loopback for the tests: `answer` turns each POSTed body (bytes) into the bytes
sent back with status 200."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def start_reward_server(answer: Callable[[bytes], bytes]) -> tuple[str, ThreadingHTTPServer]:
    """Serve in a daemon thread; returns the scoring URL and the server (`shutdown()` it when done)."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            data = answer(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/score", server
