"""`reward.timeout_s` bounds the whole request to a remote reward, not each socket read: a server that
trickles its answer (or its headers) a byte at a time cannot hold a run."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from common.config import RewardConfig
from rewards.remote import RemoteScorer
from rewards.scorers import RewardError

BODY = b'{"scores": [1.0]}'


def _trickler(head_first: bool):
    """A local server that answers each request (at most 3) one byte every 0.2 s, for at most 6 s, then
    closes; it stops by itself. `head_first`: the headers arrive at once and the body trickles; else the
    status line itself trickles."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(15)

    def serve():
        try:
            for _ in range(3):
                try:
                    conn, _ = srv.accept()
                except OSError:
                    return
                with conn:
                    conn.settimeout(5)
                    try:
                        conn.recv(65536)
                        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(BODY) + 30}\r\n\r\n".encode()
                        if head_first:
                            conn.sendall(head)
                        for b in ((BODY + b" " * 30) if head_first else head + BODY)[:30]:
                            conn.sendall(bytes([b]))
                            time.sleep(0.2)
                    except OSError:
                        pass  # the client gave up: next connection
        finally:
            srv.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{srv.getsockname()[1]}/score"


@pytest.mark.parametrize("head_first", [True, False], ids=["trickled-body", "trickled-headers"])
def test_timeout_bounds_the_whole_request(head_first):
    scorer = RemoteScorer(RewardConfig(kind="remote", url=_trickler(head_first), timeout_s=1.0, retries=1))
    t = time.monotonic()
    with pytest.raises(RewardError, match=r"failed after 2 tries \(TimeoutError: .*reward.timeout_s=1s"):
        scorer(["p"], ["r"], [None])
    assert time.monotonic() - t < 4.0  # two tries of 1 s and a 0.5 s back-off, not 2 x 6 s of trickle


def test_a_prompt_answer_within_the_deadline_still_scores():
    import json

    from reward_server import start_reward_server

    url, srv = start_reward_server(
        lambda body: json.dumps({"scores": [float(len(r)) for r in json.loads(body)["responses"]]}).encode()
    )
    try:
        scorer = RemoteScorer(RewardConfig(kind="remote", url=url, timeout_s=2.0, batch_size=2))
        assert scorer(["a", "b", "c"], ["x", "yy", "zzz"], [None] * 3) == [1.0, 2.0, 3.0]
    finally:
        srv.shutdown()
        srv.server_close()
