"""The iteration loop: select -> generate -> score and pair -> train -> (APO step) -> sync -> eval -> record.

Everything heavy happens in actors; the driver moves token ids, scores, metrics and object refs.
"""

from __future__ import annotations

import errno
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import ray

from common.config import RunConfig
from common.errors import OnalignError
from common.methods import get_method
from common.records import Rollout
from common.ticker import Ticker
from pipeline.checkpoint import checkpoint_state, fingerprint_of, resume_point
from pipeline.data import PromptSet
from pipeline.metrics import RolloutStage, TrainStage, iteration_row, merge_rank_stats
from pipeline.progress import ProgressView
from pipeline.rundir import RunDir
from workers.actor_group import TrainerGroup
from workers.batches import steps_per_rank
from workers.weight_sync import init_sync, sync_weights

# a write that failed for want of space (a full disk, a quota, a file-size limit)
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class PipelineError(OnalignError, RuntimeError):
    """A failure the user can act on; the message says what happened and how to go on."""


@dataclass
class Workers:
    """The long-lived heavy actors: vLLM engines and DeepSpeed ranks (reusable across runs)."""

    rollouts: list
    trainers: TrainerGroup

    def shutdown(self) -> None:
        self.trainers.kill()
        for r in self.rollouts:
            ray.kill(r, no_restart=True)
        from pipeline.placement import remove_engine_placements

        remove_engine_placements()


class Loop:
    def __init__(
        self,
        cfg: RunConfig,
        workers: Workers,
        model_path: str,
        train: PromptSet,
        eval_set: PromptSet,
        rundir: RunDir,
        reward_actor,
        reporter,
        placement: dict[str, dict] | None = None,
    ) -> None:
        """`placement`: each actor's node by name (logs/actors.json), for the failure messages."""
        self.cfg, self.workers, self.model_path = cfg, workers, model_path
        self.train_set, self.eval_set = train, eval_set
        self.rundir, self.reward, self.reporter = rundir, reward_actor, reporter
        self.method = get_method(cfg.algorithm.name)
        self.initial_eval: list[float] = []
        self.sync_backend = cfg.sync_backend()
        self.colocated = cfg.placement == "colocate"
        self.view = ProgressView(reporter.console, enabled=reporter.console.rich)  # bars on a terminal only
        self.placement = placement or {}
        self.first = 1  # the first iteration this process runs (`start`: after the resumed one)

    def run(self) -> list[dict]:
        try:
            self.first = self.start()
            for it in range(self.first, self.cfg.iterations + 1):
                row = self.iteration(it)
                self.record(row)  # metrics first: a resume truncates rows past the last complete checkpoint
                self.save_checkpoint(it)
                self.rundir.publish()
        except OSError as e:  # the driver's own writes (metrics, samples, state.json); the actors' in `get`
            if e.errno not in NO_SPACE:
                raise
            raise self.out_of_space(e, "writing the run's records") from None
        rows = self.rundir.read_metrics()
        check_something_trained(rows)
        return rows

    def start(self) -> int:
        """Set up actors for this run (fresh or resumed); returns the first iteration to run."""
        cfg = self.cfg
        self.get(
            self.reward.reset.remote(
                self.train_set.as_dict(),
                self.eval_set.as_dict(),
                cfg.algorithm,
                cfg.selection,
                cfg.rollout.n_samples,
                cfg.seed,
                cfg.data.prompts_per_iteration,
            ),
            "reward reset",
        )
        self.get(
            self.workers.trainers.call(
                "setup",
                self.model_path,
                cfg.train.model_copy(update={"reference_logps": cfg.resolved_reference_logps()}),
                cfg.algorithm,
                cfg.seed,
                cfg.model.trust_remote_code,
            ),
            "trainer setup",
        )
        first = self.restore() if cfg.resume else 1
        engine_workers = cfg.rollout.num_engines * cfg.rollout.tensor_parallel_size
        self.get(
            init_sync(self.workers.trainers, self.workers.rollouts, self.sync_backend, engine_workers, cfg.model.dtype),
            "weight-sync set-up",
        )
        self.sync()
        if first == 1:
            with self.view.showing():
                initial = self.evaluate(0)
            data_counts = {f"train_{k}": v for k, v in self.train_set.counts.items()}
            data_counts.update({f"eval_{k}": v for k, v in self.eval_set.counts.items()})
            row = {
                "iteration": 0,
                **initial,
                "train_prompts": len(self.train_set),
                "eval_prompts": len(self.eval_set),
                **data_counts,
            }
            self.record(row)
            self.rundir.publish()
        return first

    def iteration(self, it: int) -> dict:
        """One iteration's stages; returns its metrics row."""
        t0 = time.perf_counter()
        selected = self.get(self.reward.select.remote(it), "selection")
        with self.view.showing():
            rollout = self.rollout_and_score(it, selected)
            trained = self.train(it, rollout.batch)
            ev = self.evaluate(it)
        # with fresh prompts per iteration the slice is the whole of this iteration's work
        n_prompts = len(selected) if self.cfg.data.prompts_per_iteration else len(self.train_set)
        row = iteration_row(it, selected, n_prompts, self.cfg.rollout.n_samples, rollout, trained, ev)
        row["time_total_s"] = time.perf_counter() - t0
        self.rundir.append_samples(
            {
                "iteration": it,
                "rollout_rewards": rollout.scored["rewards"],
                "pair_weights": row.pop("pair_weights", None),  # wdpo, in prompt order
                "pair_prompts": row.pop("pair_prompts", None),  # the prompt of each weight
            }
        )
        return row

    def rollout_and_score(self, it: int, selected: list[int]) -> RolloutStage:
        """Generate for the selected prompts, score the responses and build the training groups."""
        cfg, n = self.cfg, self.cfg.rollout.n_samples
        t = time.perf_counter()
        rollouts = self.generate(
            self.train_set, selected, n, cfg.rollout.temperature, it, f"iteration {it}: generating responses"
        )
        time_generate = time.perf_counter() - t
        t = time.perf_counter()
        progress = self.view.bar(f"iteration {it}: scoring responses", len(rollouts))
        scored = self.get(self.reward.ingest.remote(rollouts, it, progress), "reward scoring", progress)
        batch, pair_stats = self.get(self.reward.batch.remote(), "pair building")
        return RolloutStage(rollouts, scored, batch, pair_stats, time_generate, time.perf_counter() - t)

    def train(self, it: int, batch) -> TrainStage:
        """Train on the iteration's groups (skipped when there are fewer than ranks), then APO's step
        (only after a step ran: extrapolating an untrained iterate would put an extrapolated point where
        APO keeps the previous optimiser output), then the sync into the engines if anything changed.
        Colocated (`placement: colocate`), the engines sleep while the trainers train."""
        cfg, trainers = self.cfg, self.workers.trainers
        t = time.perf_counter()
        stats: dict = {"loss": None, "pair_accuracy": None, "train_steps": 0}
        asleep = False
        if len(batch) >= trainers.world:
            if self.colocated:  # the engines give the GPUs to the trainers until the sync
                self.get([e.sleep.remote(cfg.rollout.sleep_level) for e in self.workers.rollouts], "engine sleep")
                asleep = True
            steps = steps_per_rank(len(batch), trainers.world, cfg.train.micro_batch_size, cfg.train.epochs)
            progress = self.view.bar(f"iteration {it}: training {cfg.algorithm.name} (optimizer steps)", steps)
            batch_ref = ray.put(batch)
            per_rank = self.get(trainers.call("train", batch_ref, it, progress, cfg.sync.check), "training", progress)
            stats = merge_rank_stats(per_rank)
            self.check_sync(it, stats.get("sync_logp_max_abs_diff"))
        apo_step = None
        if self.method.extrapolates and stats["train_steps"]:
            apo_step = self.get(trainers.call("extrapolate", cfg.algorithm.apo_alpha), "APO extrapolation")[0]
        time_train = time.perf_counter() - t
        time_sync = self.sync(asleep) if stats["train_steps"] or apo_step or asleep else 0.0
        return TrainStage(stats, apo_step, time_train, time_sync)

    def check_sync(self, it: int, gap: float | None) -> None:
        """Stop the run when the engines sampled iteration `it` from another policy than the trainers hold (a
        NaN gap included)."""
        tolerance = self.cfg.sync_tolerance()
        if not self.cfg.sync.check or gap is None or gap <= tolerance:
            return
        problem = (
            f"iteration {it}: the engine sampled from another policy than the trainers hold: the log-probs of its "
            f"samples differ from the trainers' by up to {gap:.3g} per token (sync.check_tolerance {tolerance:g})"
        )
        if it == self.first:  # both sides had just loaded the same weights from disk
            raise self.stopped(
                f"{problem}, right after both loaded the same weights: vLLM and transformers compute this model "
                "differently",
                "check that both support its architecture (logs/rollout-*.log); raise sync.check_tolerance, or set "
                "sync.check=false, only once that difference is understood",
            )
        raise self.stopped(
            f"{problem}, so the weight sync after iteration {it - 1} did not reach the engine",
            "check the weight sync (logs/rollout-*.log, sync.backend)",
        )

    def stopped(self, problem: str, fix: str) -> PipelineError:
        """The error that ends a run: what happened, what is saved, and how to go on."""
        done = self.rundir.complete_checkpoints()
        if done:
            return PipelineError(
                f"{problem}. Iterations up to {done[-1]} are saved in {self.rundir.checkpoints}: {fix}, then "
                "rerun with --resume"
            )
        return PipelineError(f"{problem}. No iteration had completed, so nothing is saved: {fix} and run again")

    def sync(self, asleep: bool = False) -> float:
        """The trainers' weights into every engine; `asleep` (colocated, after training): the engines wake
        their weights first and their KV cache after (vLLM's order: no cache is allocated while the trainers'
        sync buffers are)."""
        t = time.perf_counter()
        engines = self.workers.rollouts
        with self.view.spinner("syncing weights into vLLM"):
            if asleep:
                self.get([e.wake_up.remote(["weights"]) for e in engines], "engine wake-up")
            refs = sync_weights(self.workers.trainers, engines, self.cfg.sync, self.sync_backend)
            self.get(refs, "weight sync")
            if asleep:
                self.get([e.wake_up.remote(["kv_cache"]) for e in engines], "engine wake-up")
        return time.perf_counter() - t

    def evaluate(self, iteration: int) -> dict:
        """Greedy answers on the held-out prompts, scored; win rate against the initial policy's answers."""
        t = time.perf_counter()
        idx = list(range(len(self.eval_set)))
        rollouts = self.generate(
            self.eval_set, idx, 1, self.cfg.eval.temperature, 10**6 + iteration, "evaluating (held-out prompts)"
        )
        rewards = self.get(self.reward.score_rollouts.remote(rollouts, "eval"), "eval scoring")
        if iteration == 0:
            self.initial_eval = rewards
        wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(rewards, self.initial_eval, strict=True)]
        k = self.cfg.eval.num_examples
        self.rundir.append_samples(
            {
                "iteration": iteration,
                "eval_rewards": rewards,
                "examples": [
                    {"prompt": self.eval_set.texts[i], "response": rollouts[i].text, "reward": rewards[i]}
                    for i in idx[:k]
                ],
            }
        )
        return {
            "eval_reward_mean": statistics.fmean(rewards),
            "win_rate_vs_initial": statistics.fmean(wins),
            "time_eval_s": time.perf_counter() - t,
        }

    def generate(
        self, prompt_set: PromptSet, indices: list[int], n: int, temperature: float, iteration: int, label: str
    ) -> list[Rollout]:
        """Spread prompts over the engines round-robin; results come back in (prompt, sample) order."""
        r = self.cfg.rollout
        engines = self.workers.rollouts
        parts = [indices[e :: len(engines)] for e in range(len(engines))]
        progress = self.view.bar(label, len(indices) * (n if temperature > 0 else 1))
        refs = [
            eng.generate.remote(
                [prompt_set.prompt_ids[i] for i in part],
                part,
                n,
                temperature,
                r.top_p,
                r.max_new_tokens,
                self.cfg.seed,
                iteration,
                progress,
            )
            for eng, part in zip(engines, parts, strict=True)
            if part
        ]
        out = [ro for chunk in self.get(refs, "generation", progress) for ro in chunk]
        return sorted(out, key=lambda ro: ro.prompt_index)  # stable: samples keep their order

    def record(self, row: dict) -> None:
        row["finished_at"] = time.time()  # unix time: when the run reached this row (time to reward)
        self.rundir.append_metrics(row)
        self.reporter.iteration_done(row)

    def fingerprint(self) -> dict:
        return fingerprint_of(self.cfg, len(self.train_set), len(self.eval_set))

    def save_checkpoint(self, iteration: int) -> None:
        """Policy files from trainer rank 0, then state.json; renamed into place only when complete. A write
        that runs out of space leaves no partial checkpoint taking what space there is."""
        tmp = self.rundir.begin_checkpoint(iteration)
        try:
            self.get(self.workers.trainers.call_rank0("save", str(tmp)), "checkpoint write")
            reward_state = self.get(self.reward.state_dict.remote(), "reward state")
            state = checkpoint_state(self.fingerprint(), self.initial_eval, reward_state)
            self.rundir.commit_checkpoint(tmp, iteration, state, keep=self.cfg.keep_checkpoints)
        except (OSError, PipelineError):  # a full disk in the trainer's write arrives as `out_of_space`'s error
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def out_of_space(self, error: OSError, what: str) -> PipelineError:
        """The stop for a full filesystem: the path, the space left there and what a checkpoint takes."""
        path = Path(error.filename or self.rundir.root)
        where = next((p for p in [path, *path.parents] if p.exists()), self.rundir.root)
        free = shutil.disk_usage(where).free / 2**20
        done = self.rundir.complete_checkpoints()
        need = ""
        if done:
            ckpt = self.rundir.checkpoint_path(done[-1])
            size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) / 2**20
            need = f"; each checkpoint takes {size:.1f} MiB and keep_checkpoints={self.cfg.keep_checkpoints} are kept"
        return self.stopped(
            f"no space left on the device: {what} ({path}: {free:.1f} MiB free there{need})",
            "free space there (or lower keep_checkpoints, or choose an output_dir with room)",
        )

    def restore(self) -> int:
        """Load the resume checkpoint into the actors; returns the first iteration still to run."""
        last, state = resume_point(self.rundir, self.cfg, self.fingerprint(), self.reporter.console.log)
        if state is None:
            return 1
        path = str(self.rundir.checkpoint_path(last))
        self.get(self.workers.trainers.call("load_checkpoint", path), "checkpoint load")
        self.get(self.reward.load_state_dict.remote(state["reward_state"]), "reward state load")
        self.initial_eval = state["initial_eval_rewards"]
        self.rundir.truncate_to(last)
        return last + 1

    def get(self, refs, what: str, progress: Ticker | None = None):
        """ray.get with the configured timeout and a message that says how to resume; with `progress`
        (from `bar`), the bar follows the actors' counts while it waits."""
        limit = f"call_timeout_s={self.cfg.call_timeout_s:g}s"
        try:
            if progress is not None:
                self.view.follow(refs, progress, self.cfg.call_timeout_s)
            return get_failing_fast(refs, self.cfg.call_timeout_s)
        except ray.exceptions.GetTimeoutError:
            fix = "raise call_timeout_s (model loading and the first steps can take minutes) or fix the stall"
            raise self.stopped(f"{what} did not answer within {limit}", fix) from None
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, OSError) and cause.errno in NO_SPACE:
                raise self.out_of_space(cause, what) from None
            if isinstance(cause, (OnalignError, ValueError)):
                raise self.stopped(f"{what} failed: {str(cause).rstrip('.')}", "fix what it names") from None
            text = " ".join(str(cause).split())
            if isinstance(cause, TimeoutError) or (
                isinstance(cause, RuntimeError) and ("timed out" in text.lower() or "timeout" in text.lower())
            ):  # torch.distributed's collectives wait call_timeout_s too (the trainers' process group timeout)
                problem = f"{what} timed out inside an actor ({type(cause).__name__}: {text[:200]}) under {limit}"
                raise self.stopped(problem, "raise call_timeout_s (the trainers' collectives wait that long)") from None
            raise
        except ray.exceptions.RayActorError as e:
            dead, lost_nodes = self.dead_actors()
            problem = f"{', '.join(dead) if dead else 'an actor'} died during {what}"
            problem += f": node {', '.join(lost_nodes)} left the cluster" if lost_nodes else f" ({type(e).__name__})"
            fix = (
                "bring the node back (or give the actors nodes that remain: the *.resources settings)"
                if lost_nodes
                else "fix the cause (see its log)"
            )
            raise self.stopped(problem, fix) from None

    def dead_actors(self, wait_s: float = 10.0) -> tuple[list[str], list[str]]:
        """The actors that are gone (a busy live one does not answer within `wait_s` and counts as alive), and
        the nodes that held them and are no longer alive ("address (id)")."""
        named = named_actors(self.workers, self.reward)
        refs = {name: a.__ray_call__.remote(lambda _actor: True) for name, a in named.items()}
        ray.wait(list(refs.values()), num_returns=len(refs), timeout=wait_s)
        dead = []
        for name, ref in refs.items():
            try:
                ray.get(ref, timeout=0)
            except ray.exceptions.RayActorError:
                dead.append(name)
            except ray.exceptions.GetTimeoutError:
                pass
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        lost = {
            f"{self.placement[name]['node_ip']} ({self.placement[name]['node_id'][:12]})"
            for name in dead
            if name in self.placement and self.placement[name]["node_id"] not in alive
        }
        return dead, sorted(lost)


def named_actors(workers: Workers, reward) -> dict:
    """A run's actors by the names of their logs (logs/<name>.log, logs/actors.json, failure messages)."""
    named = {f"rollout-{i}": r for i, r in enumerate(workers.rollouts)}
    named |= {f"trainer-{i}": t for i, t in enumerate(workers.trainers.actors)}
    return named | {"reward": reward}


def get_failing_fast(refs, timeout_s: float):
    """`ray.get(refs)`, except that the first failure raises at once: `ray.get` on a list waits for every
    ref, so one dead trainer rank would wait the whole timeout on its peers, stuck in a collective."""
    if not isinstance(refs, list):
        return ray.get(refs, timeout=timeout_s)
    deadline = time.monotonic() + timeout_s
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            raise ray.exceptions.GetTimeoutError()
        ray.get(ready)  # raises the failure, if any
    return ray.get(refs)


def check_something_trained(rows: list[dict]) -> None:
    """A run whose iterations all skipped training did nothing: end it with an error that says why."""
    ran = [r for r in rows if r["iteration"] >= 1]
    if not ran or any(not r.get("training_skipped") for r in ran):
        return
    pairs, ties = sum(r.get("pairs") or 0 for r in ran), sum(r.get("pairs_dropped_ties") or 0 for r in ran)
    reason = (
        f"every prompt's samples tied in reward ({ties} prompts dropped), so no preference pair could be built; "
        "check that the reward separates good from bad responses and that samples differ (rollout.temperature)"
        if pairs == 0
        else f"only {pairs} pairs over {len(ran)} iterations, fewer than the train.num_workers ranks per iteration"
    )
    raise PipelineError(f"no iteration trained: {reason}. The metrics of the run are in metrics.jsonl")
