"""A tiny learned reward model for tests and the demo's `model` variant, built offline.

A sequence-classification head on the tiny policy's backbone, trained with the Bradley-Terry loss
-log sigmoid(s(x, y+) - s(x, y-)) on preferences generated from the built-in task: the right reversal
beats a wrong one (a letter not in the word, a dropped letter, or an extra letter).
Saved, with the policy's tokenizer and chat template, under the same cache as the tiny policy.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

from pipeline.builtin_task import make_examples

RM_VERSION = 5  # 5: checked every 250 steps from step 500, stopping at the target (4: 1500 steps first)


ERROR_KINDS = ("absent", "dropped", "extra")


def wrong_answer(word: str, rng: random.Random, kind: str | None = None) -> str:
    """A wrong answer: a letter that is not in the word, a dropped letter, or an extra letter (`kind`, or
    one drawn at random)."""
    chars = list(word[::-1])
    absent = [c for c in string.ascii_lowercase if c not in word]
    drawn = rng.randrange(3)
    kind = kind or ERROR_KINDS[drawn]
    if kind == "absent":
        chars[rng.randrange(len(chars))] = rng.choice(absent)
    elif kind == "dropped":
        del chars[rng.randrange(len(chars))]
    else:
        chars.insert(rng.randrange(len(chars) + 1), rng.choice(absent))
    return "".join(chars)


def preference_pairs(n: int, seed: int, kind: str | None = None) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) with chosen the exact reversal and rejected an error of `kind` (or mixed)."""
    rows, _ = make_examples(n, 0, seed=seed)
    rng = random.Random(seed)
    return [(r["prompt"], r["response"], wrong_answer(r["prompt"].split()[-1], rng, kind)) for r in rows]


def _encode(tokenizer, prompt: str, response: str) -> list[int]:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=True
    )
    return list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids)


def _scores(model, tokenizer, texts: list[tuple[str, str]], memo: dict | None = None):
    """The RM's score of each (prompt, response); `memo` keeps each pair's token ids (the build samples the
    same pairs many times, and rendering the chat template took most of a step)."""
    import torch

    memo = {} if memo is None else memo
    seqs = [memo.get(t) or memo.setdefault(t, _encode(tokenizer, *t)) for t in texts]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
    return model(input_ids=ids, attention_mask=attn).logits[:, 0]


def pair_accuracy(model, tokenizer, pairs: list[tuple[str, str, str]]) -> float:
    import torch

    with torch.no_grad():
        good = _scores(model, tokenizer, [(p, c) for p, c, _ in pairs])
        bad = _scores(model, tokenizer, [(p, r) for p, _, r in pairs])
    return float((good > bad).float().mean())


# This 2-layer RM learns to rank a dropped or an extra letter below the right answer, but not to spot a
# foreign letter (it compares lengths, not letters: that kind stays near chance). So the build trains until
# the learnable kinds are ranked right on validation pairs, however many steps a machine's rounding takes.
LEARNABLE_KINDS = ("dropped", "extra")
TARGET_ACCURACY = 0.95


def build_tiny_reward_model(
    out_dir: Path,
    policy_dir: Path,
    steps: int = 500,
    seed: int = 0,
    max_steps: int = 4500,
    check_every: int = 250,
    lr: float = 3e-4,
) -> dict:
    """Train until the learnable error kinds are ranked right on validation pairs (`TARGET_ACCURACY`, checked
    after `steps`, then every `check_every` steps) or `max_steps`; save the model and what the build reached."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForSequenceClassification.from_pretrained(policy_dir, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    train = preference_pairs(32768, seed=seed + 500)  # many distinct words: no memorising
    held_out = preference_pairs(256, seed=seed + 900)
    validation = {kind: preference_pairs(128, seed=seed + 700, kind=kind) for kind in LEARNABLE_KINDS}
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = random.Random(seed)
    done = 0
    memo: dict = {}
    while True:
        model.train()
        for _ in range(steps if done == 0 else check_every):
            batch = rng.sample(train, 32)
            good = _scores(model, tokenizer, [(p, c) for p, c, _ in batch], memo)
            bad = _scores(model, tokenizer, [(p, r) for p, _, r in batch], memo)
            loss = -F.logsigmoid(good - bad).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
        model.eval()
        val = {kind: pair_accuracy(model, tokenizer, pairs) for kind, pairs in validation.items()}
        if min(val.values()) >= TARGET_ACCURACY or done >= max_steps:
            break
    acc = pair_accuracy(model, tokenizer, held_out)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    info = {"held_out_pair_accuracy": acc, "validation": val, "steps": done, "final_loss": float(loss.detach())}
    (out_dir / "onalign_build.json").write_text(json.dumps(info))
    return info


def tiny_reward_model_path() -> Path:
    """The cached tiny reward model next to the tiny policy, built on first use."""
    from pipeline.cache import cached_build
    from pipeline.tiny_model import reproducible_build, tiny_model_path

    policy = tiny_model_path()

    def build(tmp: Path) -> dict:
        with reproducible_build(0):
            return build_tiny_reward_model(tmp, policy)

    return cached_build(policy.parent / f"{policy.name}-rm-v{RM_VERSION}", build)
