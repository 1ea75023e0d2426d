"""One iteration's DeepSpeed engine: its config, its fp32 masters under bf16, the full weights gathered back
from it, and its release (nothing of it may survive into the next iteration)."""

from __future__ import annotations

import gc

import torch

from common.config import TrainConfig
from workers import heap
from workers.weights import StateDict

# ZeRO's gradient-reduction and all-gather buckets on CPU ranks, in elements (DeepSpeed's default, 5e8, is a
# 2 GB fp32 buffer allocated at every backward: tcmalloc keeps such a freed span and later allocations
# touch it piece by piece, so a 2-rank group's peak held one such buffer per rank).
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


def gather_fp32(engine, keys: list[str], kept: StateDict, masters: bool) -> StateDict:
    """Full fp32 weights on CPU, on every rank: the optimizer's fp32 masters (`masters`: under bf16 the module
    holds only their bf16 rounding; in fp32 the module's parameters are the masters, with no extra collective),
    assembled from every rank's fragment (a collective: all ranks run it). `keys`: the state dict's names in
    order; `kept`: the untrained tensors (frozen parameters, buffers) in their fp32 original. Adam's moments
    are freed first (the iteration is over), so the new copy takes their place at the memory peak."""
    from deepspeed.utils import safe_get_full_fp32_param

    base = getattr(engine.optimizer, "optimizer", None)
    if base is not None and hasattr(base, "state"):
        base.state.clear()
    module = engine.module
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
