"""The reward actor: scores responses, keeps each prompt's current samples, selects prompts (OPTune)
and builds the training groups of the configured method.

On-policy by default (`algorithm.pair_pool: current`): a regenerated prompt's pool is replaced by this
iteration's samples and its group rebuilt from them alone; a prompt that is not regenerated keeps its
group unchanged (OPTune's reuse). `pair_pool: all` keeps every sample so far instead.

A plain class; the driver wraps it with `ray.remote`. Its whole state (pools and current groups) is
JSON-able for the run's checkpoint.
"""

from __future__ import annotations

import dataclasses
import statistics

import numpy as np

from common.config import AlgorithmConfig, RewardConfig, SelectionConfig
from common.devices import hidden_gpus_env
from common.methods import get_method
from common.records import PreferenceBatch, PreferenceGroup, Rollout
from common.ticker import Ticker
from rewards.pairs import GROUP_BUILDERS
from rewards.scorers import make_scorer, score
from rewards.selection import prompt_score, select_prompts


def reward_actor_options(cfg: RewardConfig) -> dict:
    """Ray options of the reward actor: its resources, and no visible GPU when it is given none."""
    env = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"} | hidden_gpus_env(cfg.num_gpus)
    return {
        "num_cpus": cfg.num_cpus,
        "num_gpus": cfg.num_gpus,
        "resources": dict(cfg.resources),
        "runtime_env": {"env_vars": env},
    }


class RewardWorker:
    def __init__(self, reward_cfg: RewardConfig | dict) -> None:
        self.cfg = RewardConfig.model_validate(reward_cfg)
        self.name, self.fn = make_scorer(self.cfg)

    # ------------------------------------------------------------ run set-up and state
    def reset(
        self,
        train: dict,
        eval_set: dict,
        algorithm: AlgorithmConfig | dict,
        selection: SelectionConfig | dict,
        n_samples: int,
        seed: int,
        prompts_per_iteration: int | None = None,
    ) -> None:
        """Start a run. `train` / `eval_set`: dicts of lists `texts`, `references`, `prompt_ids`, `sft_ids`."""
        self.train, self.eval = train, eval_set
        self.algo_cfg = AlgorithmConfig.model_validate(algorithm)
        self.method = get_method(self.algo_cfg.name)
        self.build_group = GROUP_BUILDERS[self.method.pairs]
        self.selection = SelectionConfig.model_validate(selection)
        self.n_samples = n_samples
        self.seed = seed
        self.per_iteration = prompts_per_iteration
        self.active: set[int] | None = None  # prompts of this iteration's slice (None: all of them)
        n = len(train["texts"])
        self.pools: list[list[Rollout]] = [[] for _ in range(n)]
        self.groups: list[PreferenceGroup | None] = [None] * n
        self.previous_groups: list[PreferenceGroup] = []  # the previous iteration's batch (SPIN mixes it in)
        self.last_groups: list[PreferenceGroup] = []  # this iteration's own groups, once `batch` ran

    def state_dict(self) -> dict:
        return {
            "pools": [[dataclasses.asdict(r) for r in pool] for pool in self.pools],
            "groups": [dataclasses.asdict(g) if g else None for g in self.groups],
            "previous_groups": [dataclasses.asdict(g) for g in self.previous_groups],
            "last_groups": [dataclasses.asdict(g) for g in self.last_groups],
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["pools"]) != len(self.pools):
            raise ValueError(
                f"checkpoint has pools for {len(state['pools'])} prompts but this run has {len(self.pools)}; "
                "resume with the same data settings or start a new output_dir"
            )
        self.pools = [[Rollout(**r) for r in pool] for pool in state["pools"]]
        self.groups = [PreferenceGroup(**g) if g else None for g in state["groups"]]
        self.previous_groups = [PreferenceGroup(**g) for g in state["previous_groups"]]
        self.last_groups = [PreferenceGroup(**g) for g in state.get("last_groups", [])]

    # ------------------------------------------------------------ selection
    def select(self, iteration: int) -> list[int]:
        """Prompts to (re)generate in this iteration: a fresh slice, or all of them first, then OPTune's rule."""
        n = len(self.pools)
        if self.per_iteration is not None:
            start = (iteration - 1) * self.per_iteration
            picked = sorted({(start + i) % n for i in range(min(self.per_iteration, n))})
            self.active = set(picked)
            return picked
        if iteration <= 1 or any(not p for p in self.pools):
            return list(range(n))
        scores = [prompt_score(p, g, self.selection.score) for p, g in zip(self.pools, self.groups, strict=True)]
        rng = np.random.default_rng([self.seed, iteration])
        return select_prompts(scores, self.selection.rho, self.selection.mode, rng)

    # ------------------------------------------------------------ scoring
    def _score(
        self, texts: list[str], references: list, prompts: list[str], rollouts: list[Rollout], tick: Ticker
    ) -> list[float]:
        """Scores in chunks of 8 reward batches, so that the progress bar moves while a model scores."""
        chunk = self.cfg.batch_size * 8
        rewards: list[float] = []
        for s in range(0, len(texts), chunk):
            part = slice(s, s + chunk)
            rewards += score(self.name, self.fn, prompts[part], texts[part], references[part])
            tick(len(texts[part]))
        if self.cfg.missing_eos_penalty is not None:
            rewards = [
                r + self.cfg.missing_eos_penalty if ro.finish_reason == "length" else r
                for r, ro in zip(rewards, rollouts, strict=True)
            ]
        return rewards

    def score_rollouts(
        self, rollouts: list[Rollout], split: str = "train", progress: Ticker | None = None
    ) -> list[float]:
        """Scores in the order given; `split` says which prompt set the indices refer to; `progress`
        counts scored responses."""
        data = self.train if split == "train" else self.eval
        prompts = [data["texts"][r.prompt_index] for r in rollouts]
        refs = [data["references"][r.prompt_index] for r in rollouts]
        with progress or Ticker() as tick:
            return self._score([r.text for r in rollouts], refs, prompts, rollouts, tick)

    def ingest(self, rollouts: list[Rollout], iteration: int, progress: Ticker | None = None) -> dict:
        """Score this iteration's train rollouts, make them their prompts' pools (or add them, with
        `pair_pool: all`) and rebuild those prompts' groups; the other prompts keep theirs."""
        rewards = self.score_rollouts(rollouts, "train", progress)
        fresh: dict[int, list[Rollout]] = {}
        for r, reward in zip(rollouts, rewards, strict=True):
            r.reward, r.iteration = reward, iteration
            fresh.setdefault(r.prompt_index, []).append(r)
        self.previous_groups = self.last_groups
        for i, samples in sorted(fresh.items()):
            self.pools[i] = self.pools[i] + samples if self.algo_cfg.pair_pool == "all" else samples
            self.groups[i] = self.build_group(
                i, self.train["prompt_ids"][i], self.pools[i], self.train["sft_ids"][i], self.n_samples
            )
        distinct = _distinct_fraction(rollouts)
        return {
            "rewards": rewards,
            "reward_mean": statistics.fmean(rewards) if rewards else float("nan"),
            "reward_std": statistics.pstdev(rewards) if rewards else float("nan"),
            "distinct_response_fraction": distinct,
        }

    def batch(self) -> tuple[PreferenceBatch, dict]:
        """The current training groups (regenerated and reused alike) and pair statistics."""
        prompts = range(len(self.pools)) if self.active is None else sorted(self.active)
        groups = [self.groups[i] for i in prompts if self.groups[i] is not None]
        dropped_ties = sum(1 for i in prompts if self.pools[i]) - len(groups)
        self.last_groups = groups
        if self.method.mixes_previous and self.algo_cfg.spin_mix_previous:
            # a prompt OPTune did not regenerate has the same pair in both: train it once
            current = {g.prompt_index for g in groups}
            groups = groups + [
                g for g in self.previous_groups if g.prompt_index not in current or self.groups[g.prompt_index] != g
            ]
        gaps = [g.rewards[0] - g.rewards[-1] for g in groups]
        stats = {
            "pairs": len(groups),
            "pairs_dropped_ties": dropped_ties,
            "pair_reward_gap_mean": statistics.fmean(gaps) if gaps else 0.0,
        }
        return PreferenceBatch(groups), stats


def _distinct_fraction(rollouts: list[Rollout]) -> float:
    """Share of a prompt's samples that are distinct, averaged over prompts (1.0 = all differ)."""
    by_prompt: dict[int, list[tuple]] = {}
    for r in rollouts:
        by_prompt.setdefault(r.prompt_index, []).append(tuple(r.response_ids))
    fractions = [len(set(v)) / len(v) for v in by_prompt.values()]
    return statistics.fmean(fractions) if fractions else 1.0
