"""A remote reward server on loopback for the tests: `answer` turns each POSTed body (bytes) into the bytes
sent back with status 200."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def start_reward_server(answer: Callable[[bytes], bytes], port: int = 0) -> tuple[str, ThreadingHTTPServer]:
    """Serve in a daemon thread (on `port`, 0: any free one); returns the scoring URL and the server
    (`shutdown()` it when done). An `answer` that raises ConnectionAbortedError drops the request unanswered."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            try:
                data = answer(self.rfile.read(int(self.headers["Content-Length"])))
            except ConnectionAbortedError:  # the server "dies": the request is dropped unanswered
                self.close_connection = True
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/score", server


class DyingRewardServer:
    """rewards.functions.reverse_reward over HTTP that dies at its `die_at`-th request (the connection dropped
    unanswered, the port closed) and comes back on the same port `back_after_s` seconds later (None: when
    `revive()` is called)."""

    def __init__(self, die_at: int | None = None, back_after_s: float | None = None) -> None:
        self.die_at, self.back_after_s = die_at, back_after_s
        self.requests = 0
        self.lock = threading.Lock()  # the server answers each request in a thread of its own
        self.url, self.server = start_reward_server(self._answer)
        self.port = self.server.server_address[1]

    def _answer(self, body: bytes) -> bytes:
        import json

        from rewards.functions import reverse_reward

        with self.lock:
            self.requests += 1
            dies = self.requests == self.die_at
        if dies:
            threading.Thread(target=self._die, daemon=True).start()
            raise ConnectionAbortedError("the reward server dies")
        req = json.loads(body)
        return json.dumps({"scores": reverse_reward(req["prompts"], req["responses"], req["references"])}).encode()

    def _die(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self.back_after_s is not None:
            threading.Timer(self.back_after_s, self.revive).start()

    def revive(self) -> None:
        self.url, self.server = start_reward_server(self._answer, self.port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
