"""The DeepSpeed trainer actor (one per data-parallel rank, ZeRO stage 2 or 3).

Between iterations every rank holds the policy as an HF state dict on CPU. Each iteration:

1. reference log-probs of the rank's shard are computed once, with no grad, from the reference
   weights (the iteration's starting policy, or the initial policy), so no reference model stays
   resident during training;
2. a DeepSpeed engine is built over the current weights (the module on the meta device, the held
   tensors assigned: no random initialisation, no copy before DeepSpeed's own) with a fresh fused AdamW
   (each iteration is its own fine-tuning run, as in SPIN/APO/OPTune), trained for `epochs` over the
   shard with one concatenated forward per micro-batch (all K responses of a group together);
3. the full weights are gathered back (ZeRO-3: `GatheredParameters`) and the engine is dropped.

APO's extrapolation is then plain tensor arithmetic on the full weights, on every rank.
"""

from __future__ import annotations

import os
import random
import statistics
import time

import torch

from common.config import AlgorithmConfig, TrainConfig
from common.methods import get_method
from common.ports import free_port
from common.records import PreferenceBatch, PreferenceGroup
from common.ticker import Ticker
from workers import collector, heap
from workers.batches import loss_inputs, micro_batches, rank_pair_weights, shard_for_rank
from workers.ds_engine import collect, ds_config, gather_fp32, load_fp32_masters, release
from workers.logprobs import batched_sequence_logprobs, packing_agrees
from workers.losses import LOSSES
from workers.sync_check import engine_logps, has_dropout, rollout_reference, sync_gap
from workers.weights import StateDict, apo_extrapolate, as_os_error, clone_weights, copy_model_files, sync_state_dict


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class TrainerWorker:
    def __init__(self, rank: int, world: int, timeout_s: float = 1800, num_gpus: float = 0) -> None:
        """The process group is not formed here: `TrainerGroup` asks rank 0 for `rendezvous_address`, then
        every rank `connect`s there (torch's env:// store is served by rank 0, wherever Ray placed it).
        `num_gpus`: this rank's share in the plan, which alone decides its device (`common.devices`)."""
        from common.devices import plan_device

        os.environ.update(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(world))
        self.device = plan_device(num_gpus, f"trainer rank {rank}")
        self.cuda = self.device.type == "cuda"
        if not self.cuda:
            os.environ["DS_ACCELERATOR"] = "cpu"
            torch.set_num_threads(1)
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.rss_start_mb = _peak_rss_mb()
        self._packing_ok: bool | None = None  # train.packing: whether the model honours it (asked once per run)

    def rendezvous_address(self) -> tuple[str, int]:
        """Rank 0: this node's IP and a port free on it, for the group's env:// store."""
        import ray

        return ray.util.get_node_ip_address(), free_port()

    def connect(self, master_addr: str, master_port: int) -> dict:
        """Join the DeepSpeed/torch.distributed group served by rank 0 at `master_addr:master_port`; one
        all-reduce proves the group works. Returns this rank's view of it."""
        from datetime import timedelta

        import deepspeed
        import torch.distributed as dist

        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        # A dead peer must not hang a collective forever: it times out and the driver reports it.
        deepspeed.init_distributed(
            dist_backend="nccl" if self.cuda else "gloo", timeout=timedelta(seconds=self.timeout_s)
        )
        probe = torch.tensor([float(self.rank + 1)], device=self.device)
        dist.all_reduce(probe)
        # imported now, while the engines start (the driver waits for this call alongside them): `setup` then
        # only reads the model
        import accelerate  # noqa: F401
        from transformers import AutoModelForCausalLM, modeling_utils  # noqa: F401

        return {
            "rank": dist.get_rank(),
            "world": dist.get_world_size(),
            "sum": int(probe.item()),
            "master": f"{master_addr}:{master_port}",
        }

    # ------------------------------------------------------------ run set-up
    def setup(
        self,
        model_path: str,
        train: TrainConfig | dict,
        algorithm: AlgorithmConfig | dict,
        seed: int,
        trust_remote_code: bool = False,
    ) -> int:
        """Load the initial policy (safetensors only) and the run's settings; returns the parameter count."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        self.train_cfg = TrainConfig.model_validate(train)
        if not self.cuda:
            heap.set_mmap_threshold(self.train_cfg.cpu_mmap_threshold_kib)
        self.algo_cfg = AlgorithmConfig.model_validate(algorithm)
        self.method = get_method(self.algo_cfg.name)
        self.seed = seed
        self.model_path = model_path
        self.hf_config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        if getattr(self.hf_config, "attn_logit_softcapping", None):
            # sdpa ignores Gemma2's attention soft-capping, which vLLM applies: train the model the engine samples
            self.hf_config._attn_implementation = "eager"
        self.trust_remote_code = trust_remote_code
        tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
        )
        # the loaded tensors themselves (the module is dropped): no second copy, and tied weights stay one tensor
        self.weights: StateDict = {k: v.detach() for k, v in model.state_dict().items()}
        del model
        self.initial = self.weights if self.algo_cfg.reference == "initial" else None
        # APO's theta_hat of the previous iteration (other methods keep no second copy of the weights)
        self.trained_prev: StateDict | None = self.weights if self.method.extrapolates else None
        collector.freeze_long_lived()  # the libraries and the policy: each iteration's collection skips them
        return sum(v.numel() for v in self.weights.values())

    def set_weights(self, weights: StateDict, trained_prev: StateDict | None = None) -> None:
        """Resume: replace the current policy (and APO's previous iterate)."""
        self.weights = clone_weights(weights)
        if self.method.extrapolates:
            self.trained_prev = clone_weights(trained_prev or weights)

    # ------------------------------------------------------------ models
    def _model(self, weights: StateDict) -> torch.nn.Module:
        """The module that trains and scores: `_fp32_module` in bf16 under `train.bf16`, on this rank's device
        (bf16 and a GPU make their own copies of the weights)."""
        model = self._fp32_module(weights)
        if self.train_cfg.bf16:
            model = model.to(torch.bfloat16)
        return model.to(self.device)

    def _fp32_module(self, weights: StateDict) -> torch.nn.Module:
        """An HF module over `weights`' own fp32 tensors on the CPU: built on the meta device (no random
        initialisation, no second copy of the weights), then the tensors assigned and the tied head re-tied.
        It never writes them: `train` hands the module to DeepSpeed, which copies the parameters into its own
        flat buffers (ZeRO-2) or partitions (ZeRO-3) before any update."""
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(
                self.hf_config, dtype=torch.float32, trust_remote_code=self.trust_remote_code
            )
        model.load_state_dict(weights, strict=False, assign=True)
        model.tie_weights()
        empty = [name for name, p in model.named_parameters() if p.is_meta]
        if empty:
            raise ValueError(f"the policy's weights lack {empty[:5]}: not a checkpoint of {self.model_path}")
        return model

    def sequence_logprobs(self, prompts: list[list[int]], responses: list[list[int]]) -> list[float]:
        """log pi(y|x) of the current policy (used to check weight sync)."""
        model = self._model(self.weights).eval()
        lp, _ = batched_sequence_logprobs(model, prompts, responses, self.pad_id)
        return lp.tolist()

    # ------------------------------------------------------------ training
    def train(
        self, batch: PreferenceBatch, iteration: int, progress: Ticker | None = None, check_sync: bool = True
    ) -> dict:
        """Train one iteration on this rank's shard; returns per-rank metrics (the driver averages).

        Rank 0 counts its optimizer steps on `progress` (every rank runs the same number). `check_sync`: measure
        `sync_logp_max_abs_diff` (`sync_gap`) before the first optimizer step: from the first micro-batch's
        forward when it holds responses the engine sampled this iteration (free), else from a no-grad probe
        of up to `micro_batch_size` of them."""
        import deepspeed

        shard = shard_for_rank(batch.groups, self.rank, self.world, iteration)
        if not shard:
            return {"steps": 0, "trained_pairs": 0}
        weights = (
            rank_pair_weights(batch.groups, self.rank, self.world, self.algo_cfg, iteration)
            if self.method.weighted
            else None
        )
        ref_logps, from_rollout = self._reference_logps(shard, iteration) if self.method.needs_reference else (None, 0)
        model = self._model(self.weights)
        plan = self._plan(shard, iteration)
        sampled = engine_logps(shard, iteration) if check_sync else None
        gap, t = None, time.perf_counter()
        if sampled is not None and (torch.isnan(sampled[plan[0][0]]).all() or has_dropout(model)):
            gap = self._probe_sync(model, shard, sampled)
            sampled = None  # measured: the first step need not
        check_s = time.perf_counter() - t
        packed = self.train_cfg.packing and self._packing_works(model)
        if self.train_cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        engine = deepspeed.initialize(  # (engine, optimizer, ...): keep no second handle on the optimizer
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=ds_config(self.train_cfg, self.world),
        )[0]
        load_fp32_masters(engine, self.weights)  # bf16: DeepSpeed's masters would be the rounded module
        # The engine now holds the policy: drop this rank's own copy until `gather_fp32` makes the next one (one
        # full copy of the weights less at the peak). A failure from here on stops the run (resume from the
        # last checkpoint), as the driver does for any failed training call.
        keys, kept = list(self.weights), self._untrained(model)
        self.weights = {}
        losses, stats, first_gap = self._fit(engine, shard, plan, ref_logps, weights, progress, packed, sampled)
        self.weights = gather_fp32(engine, keys, kept, masters=self.train_cfg.bf16)
        release(engine)
        del engine, model
        collect()
        out = {"steps": len(losses), "trained_pairs": len(shard), "loss": statistics.fmean(losses)}
        out["groups_waiting"] = len(batch.groups) % self.world  # left for a later iteration (`trained_order`)
        if ref_logps is not None:
            out["ref_logps_from_rollout"] = from_rollout / ref_logps.numel()
        out.update({k: statistics.fmean(v) for k, v in stats.items()})
        gap = first_gap if gap is None else gap
        if gap is not None:
            out["sync_logp_max_abs_diff"] = gap
        if check_sync:
            out["time_sync_check_s"] = check_s  # the probe's; the first micro-batch's comparison is free
        if weights is not None:  # (prompt, weight) of each pair this rank trained, for samples.jsonl
            out["pair_weights"] = [(g.prompt_index, float(w)) for g, w in zip(shard, weights, strict=True)]
        return out

    def _plan(self, shard: list[PreferenceGroup], iteration: int) -> list[list[list[int]]]:
        """Each epoch's micro-batches (indices into the shard), in training order."""
        widths = [len(g.prompt_ids) + max(map(len, g.responses)) for g in shard]
        mb, by_length = self.train_cfg.micro_batch_size, self.train_cfg.group_by_length
        return [
            micro_batches(widths, mb, random.Random(hash((self.seed, iteration, epoch))), by_length)
            for epoch in range(self.train_cfg.epochs)
        ]

    def _probe_sync(self, model: torch.nn.Module, shard: list[PreferenceGroup], sampled: torch.Tensor) -> float | None:
        """`sync_gap` from a no-grad eval-mode forward of up to `micro_batch_size` of the responses the engine
        sampled (the first micro-batch holds none, or trains with dropout)."""
        slots = [(int(i), int(k)) for i, k in (~torch.isnan(sampled)).nonzero().tolist()]
        slots = slots[: self.train_cfg.micro_batch_size]
        if not slots:
            return None
        was_training = model.training
        model.eval()
        logps, lengths = batched_sequence_logprobs(
            model, [shard[i].prompt_ids for i, _ in slots], [shard[i].responses[k] for i, k in slots], self.pad_id
        )
        model.train(was_training)
        return sync_gap(logps, torch.tensor([float(sampled[i, k]) for i, k in slots]), lengths)

    def _fit(
        self,
        engine,
        shard: list[PreferenceGroup],
        plan: list[list[list[int]]],
        ref_logps: torch.Tensor | None,
        weights: torch.Tensor | None,
        progress: Ticker | None,
        packed: bool = False,
        sampled: torch.Tensor | None = None,
    ) -> tuple[list[float], dict[str, list[float]], float | None]:
        """`plan`'s epochs over the shard, one optimizer step per micro-batch; returns each step's loss, the
        loss's per-item statistics and, given `sampled` (`engine_logps`), the `sync_gap` of the first
        micro-batch's forward (before any step: the policy the engine sampled from). Its own frame holds the
        last step's loss and graph, so they are gone when it returns (see `release`)."""
        tick = progress if progress is not None and self.rank == 0 else Ticker()
        losses: list[float] = []
        stats: dict[str, list[float]] = {}
        gap = None
        for epoch in plan:
            for idx in epoch:
                inputs = loss_inputs(
                    engine,
                    [shard[i] for i in idx],
                    self.method,
                    self.pad_id,
                    ref_logps[idx] if ref_logps is not None else None,
                    weights[idx] if weights is not None else None,
                    packed,
                )
                if sampled is not None and not losses:
                    gap = sync_gap(inputs.logps, sampled[idx], inputs.lengths)
                per_item, item_stats = LOSSES[self.method.loss](inputs, self.algo_cfg)
                loss = per_item.mean()
                engine.backward(loss)
                engine.step()
                tick()
                losses.append(float(loss.detach()))
                for key, val in item_stats.items():
                    stats.setdefault(key, []).extend(val.float().cpu().tolist())
        tick.flush()
        return losses, stats, gap

    def _packing_works(self, model: torch.nn.Module) -> bool:
        """`train.packing`: whether this model computes packed rows as padded ones (asked once per run)."""
        if self._packing_ok is None:
            self._packing_ok = packing_agrees(model, self.pad_id)
            if not self._packing_ok and self.rank == 0:
                import warnings

                warnings.warn(
                    f"train.packing: {type(model).__name__} gives packed rows other log-probs than padded ones "
                    "(it does not keep attention inside each sequence from the position ids); training padded",
                    stacklevel=2,
                )
        return self._packing_ok

    def _reference_logps(self, shard: list[PreferenceGroup], iteration: int) -> tuple[torch.Tensor, int]:
        """Reference log-probs [groups, K] of the shard, with no grad, and how many came from the rollout.

        The reference is the initial policy or the iteration's starting one (`self.weights`); with
        `reference_logps: rollout` the samples that policy drew this iteration bring their own, and a
        reference model is built (then dropped: none stays resident while training) only for the rest."""
        if self.initial is None and self.train_cfg.reference_logps == "rollout":
            ref_logps, missing = rollout_reference(shard, iteration)
        else:
            ref_logps = torch.zeros(len(shard), len(shard[0].responses))
            missing = [(i, k) for i in range(len(shard)) for k in range(len(shard[i].responses))]
        if missing:
            ref_model = self._model(self.initial if self.initial is not None else self.weights).eval()
            prompts = [shard[i].prompt_ids for i, _ in missing]
            responses = [shard[i].responses[k] for i, k in missing]
            logps, _ = batched_sequence_logprobs(ref_model, prompts, responses, self.pad_id)
            rows, cols = zip(*missing, strict=True)
            ref_logps[list(rows), list(cols)] = logps
            del ref_model
        return ref_logps, ref_logps.numel() - len(missing)

    def _untrained(self, model: torch.nn.Module) -> StateDict:
        """What training leaves as it is, in its fp32 original: frozen parameters and buffers (under bf16 the
        module holds only a rounded copy of them)."""
        frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
        frozen |= {name for name, _ in model.named_buffers()}
        return {name: self.weights[name] for name in frozen if name in self.weights}

    def extrapolate(self, alpha: float) -> float:
        """APO: theta <- theta_hat + alpha * (theta_hat - theta_hat_prev); returns the step's L2 norm.

        Call only after an iteration that trained (the driver skips it otherwise), so the previous-iterate
        slot always holds an optimiser output theta_hat, never an extrapolated point."""
        trained = self.weights
        self.weights, step = apo_extrapolate(trained, self.trained_prev, alpha)
        self.trained_prev = trained
        return step

    def memory_mb(self) -> dict[str, float]:
        """Resident memory of this rank's process (benchmarks): after start-up (libraries loaded, no model)
        and the peak so far."""
        return {"start": self.rss_start_mb, "peak": _peak_rss_mb()}

    # ------------------------------------------------------------ weights out
    def init_nccl_sync(self, engines: list, world_size: int, dtype: str) -> None:
        """GPU path, rank 0: open vLLM's NCCL weight-transfer group with every engine worker (`nccl_sender`);
        the fp32 weights go out in the engine's `dtype`."""
        from workers.nccl_client import nccl_sender, state_dict_source

        source = state_dict_source(self.sync_weights, getattr(torch, dtype), self.device)
        self.weight_sender = nccl_sender(engines, world_size, source)

    def init_ipc_sync(self, engines: list, dtype: str) -> None:
        """GPU path under `placement: colocate`, every rank: vLLM's CUDA IPC weight transfer (`ipc_sender`)."""
        from workers.nccl_client import ipc_sender, state_dict_source

        source = state_dict_source(self.sync_weights, getattr(torch, dtype), self.device)
        self.weight_sender = ipc_sender(engines, self.rank, source)

    def send_weights(self) -> None:
        """GPU path: the current weights into every engine (NCCL: rank 0's packed broadcast; IPC: every rank)."""
        self.weight_sender.send_weights()

    def get_weights(self) -> StateDict:
        return self.weights

    def sync_weights(self) -> StateDict:
        """What the engines load: the HF state dict with tied weights sent once, under the embedding's name
        (engines whose model has no `lm_head` module when it is tied, Gemma2's among them, reject it)."""
        return sync_state_dict(self.weights, self.hf_config)

    def weights_for_sync(self) -> dict:
        """The current weights for the CPU sync path, as zero-copy numpy views (`cpu_transfer.to_wire`)."""
        from workers.cpu_transfer import to_wire

        return to_wire(self.sync_weights())

    def save(self, path: str) -> None:
        """Checkpoint: `path/policy` (HF model dir, safetensors + tokenizer) and APO's previous iterate, in fp32
        whatever `train.bf16` says: the fp32 masters are the policy, and a run resumed from their bf16 rounding
        would not continue the run that stopped."""
        if self.rank != 0:
            return
        from safetensors.torch import save_file
        from transformers import AutoTokenizer

        model = self._fp32_module(self.weights)
        policy = os.path.join(path, "policy")
        try:
            model.save_pretrained(policy, safe_serialization=True)
            AutoTokenizer.from_pretrained(self.model_path).save_pretrained(policy)
            copy_model_files(self.model_path, policy)
            if self.method.extrapolates:
                prev = {k: v.clone().contiguous() for k, v in self.trained_prev.items()}  # untie shared storage
                save_file(prev, os.path.join(path, "apo_prev.safetensors"))
        except Exception as e:
            mapped = as_os_error(e, policy)
            if mapped is e:
                raise
            raise mapped from e

    def load_checkpoint(self, path: str) -> None:
        """Resume from `save`'s layout (safetensors only; no pickle is ever loaded)."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            os.path.join(path, "policy"),
            dtype=torch.float32,
            use_safetensors=True,
            trust_remote_code=self.trust_remote_code,
        )
        weights = {k: v.detach() for k, v in model.state_dict().items()}
        del model
        prev = os.path.join(path, "apo_prev.safetensors")
        if os.path.exists(prev):
            from safetensors.torch import load_file

            loaded = load_file(prev)
            trained_prev = {k: loaded.get(k, weights[k]) for k in weights}
        else:
            trained_prev = weights
        self.set_weights(weights, trained_prev)
