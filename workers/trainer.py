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

import gc
import os
import random
import statistics
import time
from typing import TypeVar

import torch

from common.config import AlgorithmConfig, TrainConfig
from common.methods import Method, get_method
from common.records import PreferenceBatch, PreferenceGroup
from common.ticker import Ticker
from workers import heap
from workers.logprobs import batched_sequence_logprobs, packing_agrees, sequence_logprobs
from workers.losses import LOSSES, LossInputs, wdpo_weights

StateDict = dict[str, torch.Tensor]
T = TypeVar("T")


def trained_order(n: int, world: int, rotate: int = 0) -> list[int]:
    """The indices of the n groups that train this iteration, in the order the ranks stride over them. Every
    rank must run the same number of collective steps, so n % world groups wait; which ones rotates with
    `rotate` (the iteration), so no group waits every time (with SPIN, the mixed-in previous pairs were the
    last ones, and never trained)."""
    if n == 0:
        return []
    start = (rotate * (n % world)) % n
    order = [*range(start, n), *range(start)]
    return order[: n - n % world]


def shard_for_rank(groups: list[T], rank: int, world: int, rotate: int = 0) -> list[T]:
    """Rank `rank`'s equal-sized strided shard of the groups that train (`trained_order`)."""
    return [groups[i] for i in trained_order(len(groups), world, rotate)[rank::world]]


def free_port() -> int:
    """A TCP port free on this machine now (call it on the node that will listen on it)."""
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def flatten(groups: list[PreferenceGroup]) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt, response) token lists of every response of every group, group by group."""
    return [g.prompt_ids for g in groups for _ in g.responses], [r for g in groups for r in g.responses]


def rank_pair_weights(
    groups: list[PreferenceGroup], rank: int, world: int, cfg: AlgorithmConfig, rotate: int = 0
) -> torch.Tensor:
    """OPTune's wDPO weights of this rank's shard (`shard_for_rank` with the same `rotate`), normalised over
    the pairs that all ranks train on together, so a pair's weight does not depend on the rank or micro-batch
    it lands in."""
    order = trained_order(len(groups), world, rotate)
    gaps = torch.tensor([groups[i].rewards[0] - groups[i].rewards[-1] for i in order], dtype=torch.float32)
    return wdpo_weights(gaps, cfg)[rank::world]


def loss_inputs(
    model,
    groups: list[PreferenceGroup],
    method: Method,
    pad_id: int,
    ref_logps: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    packed: bool = False,
) -> LossInputs:
    """The loss inputs of one micro-batch: policy log-probs of every group's responses (with gradient),
    their lengths and rewards, the given reference log-probs and pair weights, and, for methods that score
    the dataset's target (SLiC-HF's y_ref), log pi(y_ref | x)."""
    k = len(groups[0].responses)
    logps, lengths = sequence_logprobs(model, *flatten(groups), pad_id, packed)
    device = logps.device
    inputs = LossInputs(
        logps=logps.view(len(groups), k),
        lengths=lengths.view(len(groups), k),
        rewards=torch.tensor([g.rewards for g in groups], dtype=torch.float32, device=device),
        ref_logps=ref_logps.to(device) if ref_logps is not None else None,
        weights=weights.to(device) if weights is not None else None,
    )
    if method.scores_sft_target:
        missing = [g.prompt_index for g in groups if not g.sft_ids]
        if missing:
            raise ValueError(f"{method.name} needs each prompt's SFT target; prompts {missing[:5]} have none")
        inputs.sft_logps, _ = sequence_logprobs(
            model, [g.prompt_ids for g in groups], [g.sft_ids for g in groups], pad_id, packed
        )
    return inputs


def engine_logps(groups: list[PreferenceGroup], iteration: int) -> torch.Tensor:
    """[groups, K]: the engine's log pi(y|x) of each response it sampled in `iteration`, NaN for the rest
    (older samples: OPTune's reused groups, SPIN's mixed-in pairs, `pair_pool: all`; dataset targets). The
    engine sampled them from the policy the trainers hold at the iteration's start."""
    out = torch.full((len(groups), len(groups[0].responses)), float("nan"))
    for i, g in enumerate(groups):
        for k in range(len(g.responses)):
            logp = g.sample_logps[k] if g.sample_logps else None
            at = g.sampled_at[k] if g.sampled_at else None
            if logp is not None and at == iteration:
                out[i, k] = logp
    return out


def rollout_reference(groups: list[PreferenceGroup], iteration: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Reference log-probs [groups, K] that the rollout already gave, and the (group, response) slots it did
    not: a response's sampled log-prob is its reference log-prob when the policy that sampled it is the
    reference, i.e. it was sampled in this `iteration` (reference = the iteration's starting policy). The
    missing slots (see `engine_logps`) need a forward pass."""
    known = engine_logps(groups, iteration)
    missing = [(int(i), int(k)) for i, k in torch.isnan(known).nonzero().tolist()]
    return known.nan_to_num(0.0), missing


def sync_gap(trainer_logps: torch.Tensor, engine: torch.Tensor, lengths: torch.Tensor) -> float | None:
    """The sync's proof: max over the responses the engine sampled (`engine` not NaN) of
    |log pi_trainer(y|x) - log pi_engine(y|x)| / |y|, the per-token gap between the trainer's policy and
    the weights the engine sampled with; None when there is no such response."""
    fresh = ~torch.isnan(engine)
    if not fresh.any():
        return None
    gap = (trainer_logps.detach().float().cpu() - engine).abs() / lengths.float().cpu().clamp(min=1)
    return float(gap[fresh].max())


def has_dropout(model: torch.nn.Module) -> bool:
    """Whether a training-mode forward of `model` is random (dropout layers, or attention dropout)."""
    if getattr(model.config, "attention_dropout", 0.0):
        return True
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


def as_os_error(error: Exception, path: str) -> Exception:
    """safetensors' Rust writer reports an I/O failure (a full disk, a quota) as `SafetensorError("... (os error
    N)")`: the OSError it stands for, naming `path`, so the driver can say what ran out; others unchanged."""
    import re

    found = None if isinstance(error, OSError) else re.search(r"\(os error (\d+)\)", str(error))
    if found is None:
        return error
    code = int(found.group(1))
    return OSError(code, os.strerror(code), path)


def clone_weights(weights: StateDict) -> StateDict:
    """A detached copy of `weights` in which tensors that share storage (tied embeddings) stay one tensor."""
    copies: dict[tuple, torch.Tensor] = {}
    out: StateDict = {}
    for name, w in weights.items():
        key = (w.untyped_storage().data_ptr(), w.storage_offset(), tuple(w.shape), tuple(w.stride()))
        if key not in copies:
            copies[key] = w.detach().clone()
        out[name] = copies[key]
    return out


def apo_extrapolate(trained: StateDict, trained_prev: StateDict, alpha: float) -> tuple[StateDict, float]:
    """APO's Nesterov step (arXiv 2410.06293): theta = theta_hat + alpha (theta_hat - theta_hat_prev).

    Returns the new weights and the step's L2 norm. Tensors that share storage (tied embeddings) stay
    tied and are counted once."""
    new: StateDict = {}
    done: dict[int, torch.Tensor] = {}
    step_sq = 0.0
    for name, w in trained.items():
        key = w.untyped_storage().data_ptr()
        if key in done:
            new[name] = done[key]
            continue
        step = alpha * (w - trained_prev[name])
        step_sq += float(step.pow(2).sum())
        new[name] = done[key] = w + step
    return new, step_sq**0.5


def sync_state_dict(weights: StateDict, hf_config) -> StateDict:
    """`weights` less the output projection when it is tied to the input embeddings (sent once)."""
    if not getattr(hf_config, "tie_word_embeddings", False):
        return weights
    return {k: v for k, v in weights.items() if k != "lm_head.weight"}


# What a checkpoint keeps byte for byte from the model the run started from: the tokenizer's files and
# the generation config (stop tokens such as Llama-3's end of turn live only there).
MODEL_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


def copy_model_files(model_dir: str, out_dir: str) -> None:
    """Copy the user's tokenizer files and generation config unchanged into a checkpoint's model dir."""
    import shutil

    for name in MODEL_FILES:
        src = os.path.join(model_dir, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(out_dir, name))


def release(engine) -> None:
    """Free an iteration's DeepSpeed engine for good. `destroy()` drops the gradient hooks that keep the model
    and optimizer alive (without it every iteration leaked one engine). The engine, its module and
    DeepSpeed's flat copies of the weights still form reference cycles, so the caller must drop its own
    references (the engine, the module, the last loss, whose graph reaches the parameters) and then call
    `collect`: collected any earlier, the cycles lived on until Python's collector happened to run, and the
    next iteration's peak held two engines' buffers."""
    engine.destroy()
    forget_zero3_engine(engine.module)


def forget_zero3_engine(module: torch.nn.Module) -> None:
    """Drop what DeepSpeed's ZeRO-3 keeps of a destroyed engine in module-level state (DeepSpeed 0.19), each
    of which kept the whole engine alive, one more every iteration: the top module it pushes onto the
    forward-module stack at set-up and never pops, and the parameter coordinator's `lru_cache` (no size
    limit) keyed by the coordinator and the submodules."""
    from deepspeed.runtime.zero import parameter_offload, partitioned_param_coordinator

    stack = parameter_offload.FWD_MODULE_STACK
    stack[:] = [m for m in stack if m is not module]
    cls = partitioned_param_coordinator.PartitionedParameterCoordinator
    method = getattr(cls, "_PartitionedParameterCoordinator__params_to_release", None)
    # the cache sits under DeepSpeed's NVTX wrapper (a closure without functools.wraps)
    for fn in [method, *(c.cell_contents for c in getattr(method, "__closure__", None) or ())]:
        if hasattr(fn, "cache_clear"):
            fn.cache_clear()  # shared by every coordinator: a live one only recomputes its entries


def collect() -> None:
    """Collect the released engine's reference cycles now and trim the heap, so the next iteration's engine
    reuses the memory."""
    gc.collect()
    heap.trim()
    if torch.cuda.is_initialized():  # give the freed blocks back to the GPU: a colocated engine wakes into them
        torch.cuda.empty_cache()


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def steps_per_rank(n_groups: int, world: int, micro_batch_size: int, epochs: int) -> int:
    """Optimizer steps each rank runs on `n_groups` groups (for the driver's progress bar)."""
    shard = len(shard_for_rank(list(range(n_groups)), 0, world))
    return epochs * -(-shard // micro_batch_size)


def micro_batches(widths: list[int], size: int, rng: random.Random, group_by_length: bool = True) -> list[list[int]]:
    """One epoch's micro-batches of indices into `widths` (each item's padded width), in random order.

    With `group_by_length` (HF's LengthGroupedSampler idea) each shuffled window of 8 micro-batches is
    sorted by width before it is cut, so a micro-batch holds similar lengths and pads little; the
    micro-batches are then shuffled, so the order stays random."""
    order = list(range(len(widths)))
    rng.shuffle(order)
    if group_by_length:
        window = size * 8
        order = [
            i
            for s in range(0, len(order), window)
            for i in sorted(order[s : s + window], key=lambda i: widths[i], reverse=True)
        ]
    batches = [order[s : s + size] for s in range(0, len(order), size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


# ZeRO's gradient-reduction and all-gather buckets on CPU ranks, in elements (DeepSpeed's default, 5e8, is a
# 2 GB fp32 buffer allocated at every backward: tcmalloc keeps such a freed span and later allocations
# touch it piece by piece, so a 2-rank group on the 13M model peaked at 2.4 GB a rank).
CPU_BUCKET_ELEMENTS = 50_000_000


def ds_config(train: TrainConfig, world: int) -> dict:
    zero: dict = {"stage": train.zero_stage}
    if train.num_gpus == 0:
        zero["reduce_bucket_size"] = zero["allgather_bucket_size"] = CPU_BUCKET_ELEMENTS
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if train.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": train.micro_batch_size * world,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": train.lr, "weight_decay": train.weight_decay, "torch_adam": True, "fused": True},
        },
        "zero_optimization": zero,
        "gradient_clipping": train.grad_clip,
        "bf16": {"enabled": train.bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def load_fp32_masters(engine, weights: StateDict) -> None:
    """Start a bf16 DeepSpeed engine from the fp32 weights, not their bf16 rounding.

    DeepSpeed builds its fp32 master copy from the module's (bf16) parameters, which would round the policy
    to bf16 at the start of every iteration and lose the small updates kept in fp32. Call on every rank right
    after `deepspeed.initialize` (ZeRO 1/2: each rank copies its own fragment; ZeRO-3: its own partition).
    A no-op when the module is fp32 (its parameters are the masters)."""
    from deepspeed.utils import safe_set_full_fp32_param

    module = engine.module
    if all(p.dtype == torch.float32 for p in module.parameters()):
        return
    for name, param in module.named_parameters():
        if name not in weights or not param.requires_grad:
            continue
        value = weights[name]
        opt = getattr(param, "_z3_optimizer", None)
        if hasattr(param, "ds_id") and opt is not None:
            # DeepSpeed's ZeRO-3 setter cuts `value` at partition * rank without the padding of the last
            # rank's partition (it fails for sizes not divisible by the world size): copy the slice here.
            part, group_idx = opt._get_fp32_opt_state_partition(param, release_swap_buffers=False)
            start = part.numel() * opt._get_param_partition_rank(param)
            piece = value.detach().reshape(-1)[start : start + part.numel()]
            part.data[: piece.numel()].copy_(piece.to(part.dtype))
            if opt._swappable_optimizer_subgroup(group_idx):
                opt._optimizer_states_and_gradient_swap_out(group_idx)
        else:
            safe_set_full_fp32_param(param, value.detach().to(param.device, torch.float32))


def state_dict_source(trainer: TrainerWorker, dtype: torch.dtype, device: torch.device):
    """vLLM `WeightSource` over the trainer's full state dict: HF names, sent in the engine's dtype.

    It reads `trainer.weights` at every round, so one source serves every sync of a run."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class StateDictSource(WeightSource):
        def metadata(self) -> list:
            return [ParamMeta(k, dtype, tuple(v.shape)) for k, v in trainer.sync_weights().items()]

        def __iter__(self):
            return engine_tensors(trainer.sync_weights(), dtype, device)

    return StateDictSource()


def engine_tensors(weights: StateDict, dtype: torch.dtype, device: torch.device):
    """(name, tensor) as the GPU sync paths hand them to vLLM's producers: each fp32 weight cast to the
    engine's dtype on the sending device (bench/gpu_trainer_check.py checks them bit for bit)."""
    for k, v in weights.items():
        yield k, v.to(device=device, dtype=dtype, non_blocking=True)


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
        # The engine now holds the policy: drop this rank's own copy until `_gather` makes the next one (one
        # full copy of the weights less at the peak). A failure from here on stops the run (resume from the
        # last checkpoint), as the driver does for any failed training call.
        keys, kept = list(self.weights), self._untrained(model)
        self.weights = {}
        losses, stats, first_gap = self._fit(engine, shard, plan, ref_logps, weights, progress, packed, sampled)
        self.weights = self._gather(engine, keys, kept)
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

    def _gather(self, engine, keys: list[str], kept: StateDict) -> StateDict:
        """Full fp32 weights on CPU, on every rank: the optimizer's fp32 masters (under bf16 the module holds
        only their bf16 rounding), assembled from every rank's fragment (a collective: all ranks run it).
        `keys`: the state dict's names in order; `kept`: `_untrained`'s tensors. Adam's moments are freed
        first (the iteration is over), so the new copy takes their place at the memory peak."""
        from deepspeed.utils import safe_get_full_fp32_param

        base = getattr(engine.optimizer, "optimizer", None)
        if base is not None and hasattr(base, "state"):
            base.state.clear()
        module = engine.module
        masters = self.train_cfg.bf16  # in fp32 the module's parameters are the masters (no extra collective)
        out: StateDict = {}
        for name, param in module.named_parameters():
            full = safe_get_full_fp32_param(param) if masters and param.requires_grad else None
            if full is None and not param.requires_grad and name in kept:
                out[name] = kept[name]  # frozen: unchanged, and still fp32
            elif full is None:  # no master copy (not an optimizer parameter): the module's own values
                if hasattr(param, "ds_id"):
                    from deepspeed.runtime.zero import GatheredParameters

                    with GatheredParameters([param]):
                        out[name] = param.detach().float().cpu().clone()
                else:
                    out[name] = param.detach().float().cpu().clone()
            else:
                out[name] = full.detach().float().cpu().clone()
        for name, buf in module.named_buffers():
            old = kept.get(name)
            # buffers are not trained; under bf16 the module holds a rounded copy of the fp32 original
            out[name] = old if old is not None and old.dtype != buf.dtype else buf.detach().cpu().clone()
        # Tied embeddings share storage: keep the names the checkpoint format expects.
        for key in keys:
            if key not in out:
                src = "model.embed_tokens.weight" if key == "lm_head.weight" else key
                out[key] = out[src]
        return {k: out[k] for k in keys}

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
        """GPU path, rank 0: open vLLM's NCCL weight-transfer group with every engine worker.

        `world_size` is 1 + num_engines x TP; engine i's workers take ranks 1 + i*TP .. (i+1)*TP
        (`EngineRanksClient`). The store is served here, on rank 0's node; the fp32 weights go out in the
        engine's `dtype`."""
        import ray
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        from workers.nccl_client import EngineRanksClient

        info = NCCLTrainerInitInfo(
            master_address=ray.util.get_node_ip_address(), master_port=free_port(), world_size=world_size, rank=0
        )
        source = state_dict_source(self, getattr(torch, dtype), self.device)
        self.weight_sender = WeightTransferTrainerFactory.trainer_init(
            info, client=EngineRanksClient(engines), source=source
        )

    def init_ipc_sync(self, engines: list, dtype: str) -> None:
        """GPU path under `placement: colocate`, every rank: vLLM's CUDA IPC weight transfer to the engines on
        the trainer ranks' GPUs (packed: one bounded staging buffer; rank 0 ships the gathered handles)."""
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory
        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

        from workers.nccl_client import EngineRanksClient

        info = IPCTrainerInitInfo(rank=self.rank, packed=True)
        source = state_dict_source(self, getattr(torch, dtype), self.device)
        self.weight_sender = WeightTransferTrainerFactory.trainer_init(
            info, client=EngineRanksClient(engines), source=source
        )

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
