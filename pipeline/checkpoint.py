"""Per-iteration checkpoints and resume.

A checkpoint is written into a temporary directory and renamed into place only when complete, so a
crash mid-write leaves the previous one loadable. It holds the policy as an HF model directory
(safetensors), APO's previous iterate, the reward actor's pools and pairs, and the initial policy's
eval rewards. Random streams are derived from (seed, iteration), so no RNG state needs saving: a
resumed run draws the same samples as an uninterrupted one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.rundir import CHECKPOINT_FORMAT

if TYPE_CHECKING:
    from pipeline.loop import Loop


def fingerprint(loop: Loop) -> dict:
    """What must match between a checkpoint and the run that resumes from it."""
    cfg = loop.cfg
    return {
        "model": cfg.model.path,
        "algorithm": cfg.algorithm.name,
        "train_prompts": len(loop.train_set),
        "eval_prompts": len(loop.eval_set),
        "data": cfg.data.train,
        "seed": cfg.seed,
    }


def save_checkpoint(loop: Loop, iteration: int) -> None:
    rundir = loop.rundir
    tmp = rundir.begin_checkpoint(iteration)
    loop.get(loop.workers.trainers.call_rank0("save", str(tmp)), "checkpoint write")
    reward_state = loop.get(loop.reward.state_dict.remote(), "reward state")
    state = {
        "fingerprint": fingerprint(loop),
        "initial_eval_rewards": loop.initial_eval,
        "reward_state": reward_state,
        "rng": "derived from (seed, iteration)",
    }
    rundir.commit_checkpoint(tmp, iteration, state, keep=loop.cfg.keep_checkpoints)


class ResumeError(RuntimeError):
    pass


def restore(loop: Loop) -> int:
    """Load the last complete checkpoint into the actors; returns the first iteration still to run."""
    rundir = loop.rundir
    done = rundir.complete_checkpoints()
    if not done:
        rundir.truncate_to(-1)  # nothing complete: start over, keeping no half-written rows
        return 1
    last = done[-1]
    state = rundir.load_state(last)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ResumeError(
            f"checkpoint {rundir.checkpoint_path(last)} has format {state.get('format')}, this version reads "
            f"{CHECKPOINT_FORMAT}; start a new output_dir"
        )
    mine = fingerprint(loop)
    diff = {k: (state["fingerprint"].get(k), v) for k, v in mine.items() if state["fingerprint"].get(k) != v}
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
        raise ResumeError(
            f"cannot resume from {rundir.checkpoint_path(last)}: it was made by a different run ({detail}); "
            "resume with the original config or choose a new output_dir"
        )
    path = rundir.checkpoint_path(last)
    loop.get(loop.workers.trainers.call("load_checkpoint", str(path)), "checkpoint load")
    loop.get(loop.reward.load_state_dict.remote(state["reward_state"]), "reward state load")
    loop.initial_eval = state["initial_eval_rewards"]
    rundir.truncate_to(last)
    return last + 1
