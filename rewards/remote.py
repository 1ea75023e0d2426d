"""`reward.kind: remote`: an HTTP endpoint that already serves a reward model.

Protocol: POST `reward.url` with JSON {"prompts": [...], "responses": [...], "references": [...]}; the
answer is JSON {"scores": [...]}, one number per response, in order. Each batch is retried
`reward.retries` times (exponential back-off) and each try has `reward.timeout_s`.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from pipeline.config import RewardConfig
from rewards.scorers import RewardError


class RemoteScorer:
    def __init__(self, cfg: RewardConfig) -> None:
        self.url, self.timeout, self.retries, self.batch_size = cfg.url, cfg.timeout_s, cfg.retries, cfg.batch_size

    def _post(self, payload: dict) -> list[float]:
        body = json.dumps(payload).encode()
        last = ""
        for attempt in range(self.retries + 1):
            try:
                req = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    answer = json.loads(resp.read())
                if not isinstance(answer, dict) or "scores" not in answer:
                    raise RewardError(f"remote reward {self.url} answered without a 'scores' list: {str(answer)[:200]}")
                return answer["scores"]
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as e:
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
