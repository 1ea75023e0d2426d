"""Reward models as real components: the tiny learned RM through the Ray reward actor, the remote kind
against a local HTTP server, and clear errors."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from common.records import Rollout
from rewards.functions import reverse_reward
from rewards.scorers import RewardError


def test_held_out_pair_accuracy(rm_path):
    """The tiny RM ranks the right reversal above a dropped or an extra letter, on pairs it never saw.

    The build trains until the dropped/extra kinds reach 0.95 on its own validation pairs, so 0.9 on held-out
    pairs holds with margin (build seed 0, 1000 steps: dropped 0.99, extra 0.99). The foreign-letter kind
    stays near chance (0.59), so it is not asserted; mixed >= (2 x 0.9 + 0.4) / 3 = 0.73 even with that kind
    at its worst (seed 0: 0.86)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.tiny_reward_model import pair_accuracy, preference_pairs

    model = AutoModelForSequenceClassification.from_pretrained(rm_path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(rm_path)
    for kind in ("dropped", "extra"):
        assert pair_accuracy(model, tok, preference_pairs(300, seed=4242, kind=kind)) > 0.9, kind
    assert pair_accuracy(model, tok, preference_pairs(256, seed=4242)) > 0.72


class _Handler(BaseHTTPRequestHandler):
    fail_first = 0

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if _Handler.fail_first > 0:
            _Handler.fail_first -= 1
            self.send_response(503)
            self.end_headers()
            return
        scores = reverse_reward(body["prompts"], body["responses"], body["references"])
        data = json.dumps({"scores": scores}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = HTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/score"
    srv.shutdown()


def test_remote_kind_against_local_server_with_retry(server):
    from common.config import RewardConfig
    from rewards.scorers import make_scorer, score

    _Handler.fail_first = 1  # the first try fails: the retry must recover
    name, fn = make_scorer(RewardConfig(kind="remote", url=server, retries=2, batch_size=2))
    prompts = ["reverse: abc", "reverse: hello", "reverse: xyz"]
    got = score(name, fn, prompts, ["cba", "oleh", "q"], [None, None, None])
    assert got == reverse_reward(prompts, ["cba", "oleh", "q"], [None] * 3)


def test_remote_kind_gives_clear_error_when_down():
    from common.config import RewardConfig
    from rewards.scorers import make_scorer, score

    name, fn = make_scorer(RewardConfig(kind="remote", url="http://127.0.0.1:9/score", retries=1, timeout_s=2))
    with pytest.raises(RewardError, match="failed after 2 tries.*check that the server is up"):
        score(name, fn, ["p"], ["r"], [None])


def test_missing_eos_penalty_applies_only_to_truncated():
    from rewards.actor import RewardWorker

    w = RewardWorker({"kind": "function", "missing_eos_penalty": -1.0})
    data = {"texts": ["reverse: abc"] * 2, "references": ["cba"] * 2, "prompt_ids": [[1]] * 2, "sft_ids": [None] * 2}
    w.reset(data, data, {"name": "dpo"}, {"mode": "all"}, 2, 0)
    got = w.score_rollouts([Rollout(0, [], "cba", "stop"), Rollout(1, [], "cba", "length")])
    assert got == [1.0, 0.0]
