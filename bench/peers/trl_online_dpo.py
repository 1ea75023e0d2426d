"""TRL's online DPO (`trl.experimental.online_dpo.OnlineDPOTrainer`) on versus.py's task, as its docs run it:
each step samples 2 completions per prompt with HF `generate`, scores them with the reward function, and
takes a DPO step on (better, worse) against a frozen copy of the initial model. One pass over the prompts
is one iteration; greedy eval after each (its time is recorded apart).

    python bench/peers/trl_online_dpo.py TASK.json OUT.json
"""

from __future__ import annotations

import sys
import time

import torch
from datasets import Dataset
from peerkit import TRL_ON_CPU, Record, hf_greedy_eval, load_task, messages, reward_function
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer


def main(task_path: str, out_path: str) -> None:
    task = load_task(task_path)
    torch.manual_seed(task["seed"])
    torch.set_num_threads(2)
    record = Record(out_path, "TRL online DPO")
    tok = AutoTokenizer.from_pretrained(task["model"])
    model = AutoModelForCausalLM.from_pretrained(task["model"], dtype=torch.float32)
    score = reward_function(task["reward"])

    def reward(prompts, completions, reference, **_) -> list[float]:
        return score([p[-1]["content"] for p in prompts], [c[-1]["content"] for c in completions], reference)

    train = Dataset.from_dict(
        {"prompt": [messages(t) for t in task["train"]["texts"]], "reference": task["train"]["references"]}
    )
    args = OnlineDPOConfig(
        output_dir="/tmp/onalign-bench/versus/trl-online-dpo",
        per_device_train_batch_size=task["batch_size"],
        num_train_epochs=task["iterations"],
        learning_rate=task["lr"],
        lr_scheduler_type="constant",
        beta=[task["beta"]],
        max_new_tokens=task["max_new_tokens"],
        temperature=task["temperature"],
        top_p=task["top_p"],
        seed=task["seed"],
        **TRL_ON_CPU,
    )
    stage = {"generate": 0.0, "eval": 0.0}

    class Timed(OnlineDPOTrainer):
        def _generate(self, *a, **k):
            t = time.perf_counter()
            try:
                return super()._generate(*a, **k)
            finally:
                stage["generate"] += time.perf_counter() - t

    class EvalEachEpoch(TrainerCallback):
        def __init__(self) -> None:
            self.epoch_start = time.perf_counter()

        def on_epoch_end(self, args, state, control, model=None, **kw):
            epoch_s = time.perf_counter() - self.epoch_start
            t = time.perf_counter()
            value = hf_greedy_eval(model, tok, task)
            eval_s = time.perf_counter() - t
            record.row(
                round(state.epoch),
                value,
                time_generate_s=stage["generate"],
                time_train_s=epoch_s - stage["generate"],
                time_eval_s=eval_s,
            )
            stage["generate"] = 0.0
            self.epoch_start = time.perf_counter()

    t = time.perf_counter()
    record.row(0, hf_greedy_eval(model, tok, task), time_eval_s=time.perf_counter() - t)
    trainer = Timed(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=train,
        processing_class=tok,
        callbacks=[EvalEachEpoch()],
    )
    trainer.train()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
