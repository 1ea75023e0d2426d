"""`reward.kind: remote`: an HTTP endpoint that already serves a reward model.

Protocol: POST `reward.url` with JSON {"prompts": [...], "responses": [...], "references": [...]}; the
answer is JSON {"scores": [...]}, one number per response, in order. Each batch is retried
`reward.retries` times (exponential back-off), and each try has `reward.timeout_s` for the whole
request (connect, send, every byte of the answer), not for each socket read: a server that trickles
its answer a byte at a time cannot hold a run for longer than that.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.request

from common.config import RewardConfig
from common.errors import RewardError


class _Deadline:
    """Shuts the sockets of one request when its time is up: a blocked read then returns at once. Each
    connection registers its socket once connected (urllib drops the connection's reference to it while the
    response is still being read), so one that connects after the deadline is shut too."""

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._socks:
                self._shut(sock)

    def register(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.append(sock)
            if self.expired:
                self._shut(sock)

    def opener(self) -> urllib.request.OpenerDirector:
        """urllib's opener (proxies and redirects as usual) whose HTTP(S) connections register here."""
        deadline = self

        def watched(base):
            class Watched(base):
                def connect(self) -> None:
                    super().connect()
                    deadline.register(self.sock)

            return Watched

        http_conn, https_conn = watched(http.client.HTTPConnection), watched(http.client.HTTPSConnection)

        class HTTP(urllib.request.HTTPHandler):
            def http_open(self, req):
                return self.do_open(http_conn, req)

        class HTTPS(urllib.request.HTTPSHandler):
            def https_open(self, req):
                return self.do_open(https_conn, req, context=self._context)

        return urllib.request.build_opener(HTTP, HTTPS)


class RemoteScorer:
    def __init__(self, cfg: RewardConfig) -> None:
        self.url, self.timeout, self.retries, self.batch_size = cfg.url, cfg.timeout_s, cfg.retries, cfg.batch_size

    def _request(self, body: bytes) -> bytes:
        """One POST, answer read in full within `timeout` seconds, or TimeoutError."""
        req = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        with _Deadline(self.timeout) as deadline:
            try:
                with deadline.opener().open(req, timeout=self.timeout) as resp:
                    data = resp.read()
            except (OSError, http.client.HTTPException) as e:
                if deadline.expired:
                    raise TimeoutError(f"no complete answer within reward.timeout_s={self.timeout:g}s") from None
                if isinstance(e, OSError):
                    raise
                raise ConnectionError(f"{type(e).__name__}: {e}") from None
            if deadline.expired:  # the sockets were shut as the last bytes came: the answer may be cut short
                raise TimeoutError(f"no complete answer within reward.timeout_s={self.timeout:g}s")
        return data

    def _post(self, payload: dict) -> list[float]:
        body = json.dumps(payload).encode()
        last = ""
        for attempt in range(self.retries + 1):
            try:
                raw = self._request(body)
                try:
                    answer = json.loads(raw)
                except ValueError:  # the server is up: retrying will not make its answer JSON
                    raise RewardError(
                        f'remote reward {self.url} answered, but not with JSON (it must answer {{"scores": [...]}}; '
                        f"it sent {raw[:120]!r}): check the URL's path and what the server returns"
                    ) from None
                if not isinstance(answer, dict) or "scores" not in answer:
                    raise RewardError(f"remote reward {self.url} answered without a 'scores' list: {str(answer)[:200]}")
                return answer["scores"]
            except (OSError, ValueError) as e:  # URLError, TimeoutError, ConnectionError; bad JSON or UTF-8
                last = f"{type(e).__name__}: {e}"
                if attempt < self.retries:
                    time.sleep(min(0.5 * 2**attempt, 8.0))
        raise RewardError(
            f"remote reward {self.url} failed after {self.retries + 1} tries ({last}); check that the server is up, "
            "or raise reward.timeout_s / reward.retries"
        )

    def __call__(self, prompts: list[str], responses: list[str], references: list[str | None]) -> list[float]:
        out: list[float] = []
        for s in range(0, len(responses), self.batch_size):
            out += self._post(
                {
                    "prompts": prompts[s : s + self.batch_size],
                    "responses": responses[s : s + self.batch_size],
                    "references": references[s : s + self.batch_size],
                }
            )
        return out
