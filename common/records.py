"""The small types that flow between the driver and the actors (token ids, scores, metrics)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Rollout:
    """One sampled response to one prompt."""

    prompt_index: int
    response_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or stop string) or "length" (cut at max_new_tokens)
    sample_logprob: float | None = None  # sum of vLLM's per-token log-probs (raw, before temperature)
    reward: float | None = None
    iteration: int = 0


@dataclass
class PreferenceGroup:
    """K >= 2 responses to one prompt, ranked best first (K = 2 for a chosen/rejected pair)."""

    prompt_index: int
    prompt_ids: list[int]
    responses: list[list[int]]
    rewards: list[float]
    sft_ids: list[int] | None = None  # the dataset's ground-truth response (SLiC-HF y_ref)
    # Per response: the engine's summed log-prob of it and the iteration whose policy sampled it (None for a
    # response the engine did not sample, such as SPIN's ground truth). The trainer takes the reference
    # log-probs from these when the reference is the policy that sampled them (`train.reference_logps`).
    sample_logps: list[float | None] | None = None
    sampled_at: list[int | None] | None = None


@dataclass
class PreferenceBatch:
    groups: list[PreferenceGroup] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.groups)
