"""What every peer script of bench/versus.py shares: the task file it is given, the reward, greedy eval with
HF `generate`, and the result file it writes. Only the standard library, torch and transformers."""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the reward functions live in the repository (rewards/functions.py)


# What both peers give TRL's trainer configs beyond the task's settings: fp32 on CPU, no logging or saving of
# their own (the peer records its rows; the loop saves the model itself)
TRL_ON_CPU = {"use_cpu": True, "bf16": False, "report_to": "none", "save_strategy": "no", "logging_steps": 10**6}


def load_task(path: str) -> dict:
    """versus.py's task: model, reward "module:function", train and eval prompts (texts, references) and the
    shared settings (n_samples, temperature, top_p, max_new_tokens, iterations, lr, beta, nll_coef,
    batch_size pairs per optimizer step, seed)."""
    return json.loads(Path(path).read_text())


def reward_function(spec: str):
    """`fn(prompts, responses, references) -> list[float]`, the same function onalign's reward actor calls."""
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def messages(text: str) -> list[dict]:
    """A prompt as onalign renders it: one user turn through the model's chat template."""
    return [{"role": "user", "content": text}]


def hf_greedy_eval(model, tok, task: dict, batch_size: int = 32) -> float:
    """Mean reward of greedy answers to the eval prompts (HF `generate`, left padding)."""
    import torch

    score = reward_function(task["reward"])
    texts, refs = task["eval"]["texts"], task["eval"]["references"]
    answers: list[str] = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for s in range(0, len(texts), batch_size):
            chunk = [
                tok.apply_chat_template(messages(t), add_generation_prompt=True, tokenize=False)
                for t in texts[s : s + batch_size]
            ]
            enc = tok(chunk, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
            out = model.generate(
                **enc, do_sample=False, max_new_tokens=task["max_new_tokens"], pad_token_id=tok.pad_token_id
            )
            answers += tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    model.train(was_training)
    rewards = score(texts, answers, refs)
    return sum(rewards) / len(rewards)


class Record:
    """The result file: one row per iteration (0 = before training) with `finished_at` (unix time), the eval
    reward and each stage's seconds."""

    def __init__(self, path: str, name: str) -> None:
        self.path, self.rows = Path(path), []
        self.name = name

    def row(self, iteration: int, eval_reward: float, **times: float) -> None:
        self.rows.append({"iteration": iteration, "eval_reward_mean": eval_reward, "finished_at": time.time(), **times})
        self.path.write_text(json.dumps({"name": self.name, "rows": self.rows}, indent=1))
        print(f"[{self.name}] iteration {iteration}: eval reward {eval_reward:.3f} {times}", flush=True)
