"""The DeepSpeed trainer actor (one per data-parallel rank, ZeRO stage 2 or 3).

Between iterations every rank holds the policy as an HF state dict on CPU. Each iteration:

1. reference log-probs of the rank's shard are computed once, with no grad, from the reference
   weights (the iteration's starting policy, or the initial policy), so no reference model stays
   resident during training;
2. a DeepSpeed engine is built from the current weights with a fresh optimizer (each iteration is
   its own fine-tuning run, as in SPIN/APO/OPTune), trained for `epochs` over the shard with one
   concatenated forward per micro-batch (all K responses of a group together);
3. the full weights are gathered back (ZeRO-3: `GatheredParameters`) and the engine is dropped.

APO's extrapolation is then plain tensor arithmetic on the full weights, on every rank.
"""

from __future__ import annotations

import gc
import os
import random
import statistics
from typing import TypeVar

import torch

from pipeline.config import AlgorithmConfig, TrainConfig
from pipeline.progress import Ticker
from pipeline.records import PreferenceBatch, PreferenceGroup
from workers.logprobs import batched_sequence_logprobs, sequence_logprobs
from workers.losses import LossInputs, get_algorithm

StateDict = dict[str, torch.Tensor]
T = TypeVar("T")


def shard_for_rank(groups: list[T], rank: int, world: int) -> list[T]:
    """Equal-sized strided shards (the remainder of len % world is dropped so that every rank runs the
    same number of collective steps)."""
    usable = len(groups) - len(groups) % world
    return groups[:usable][rank::world]


def release(engine) -> None:
    """Free an iteration's DeepSpeed engine for good: `destroy()` drops the gradient hooks that keep the
    model and optimizer alive (without it every iteration leaked one engine), then the heap is trimmed so
    the next iteration's engine reuses the memory."""
    engine.destroy()
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


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


def ds_config(train: TrainConfig, world: int) -> dict:
    zero: dict = {"stage": train.zero_stage}
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
            "params": {"lr": train.lr, "weight_decay": train.weight_decay, "torch_adam": True},
        },
        "zero_optimization": zero,
        "gradient_clipping": train.grad_clip,
        "bf16": {"enabled": train.bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def state_dict_source(trainer: TrainerWorker, dtype: torch.dtype, device: torch.device):
    """vLLM `WeightSource` over the trainer's full state dict: HF names, sent in the engine's dtype.

    It reads `trainer.weights` at every round, so one source serves every sync of a run."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class StateDictSource(WeightSource):
        def metadata(self) -> list:
            return [ParamMeta(k, dtype, tuple(v.shape)) for k, v in trainer.weights.items()]

        def __iter__(self):
            for k, v in trainer.weights.items():
                yield k, v.to(device=device, dtype=dtype, non_blocking=True)

    return StateDictSource()


class TrainerWorker:
    def __init__(self, rank: int, world: int, master_addr: str, master_port: int, timeout_s: float = 1800) -> None:
        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(rank),
            LOCAL_RANK="0",
            WORLD_SIZE=str(world),
        )
        self.cuda = torch.cuda.is_available()
        if not self.cuda:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            torch.set_num_threads(1)
        from datetime import timedelta

        import deepspeed

        # A dead peer must not hang a collective forever: it times out and the driver reports it.
        deepspeed.init_distributed(dist_backend="nccl" if self.cuda else "gloo", timeout=timedelta(seconds=timeout_s))
        self.rank, self.world = rank, world
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        self.rss_start_mb = _peak_rss_mb()

    # ------------------------------------------------------------ run set-up
    def setup(self, model_path: str, train: dict, algorithm: dict, seed: int, trust_remote_code: bool = False) -> int:
        """Load the initial policy (safetensors only) and the run's settings; returns the parameter count."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        self.train_cfg = TrainConfig(**train)
        self.algo_cfg = AlgorithmConfig(**algorithm)
        self.algorithm = get_algorithm(self.algo_cfg.name)
        self.seed = seed
        self.model_path = model_path
        self.hf_config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.trust_remote_code = trust_remote_code
        tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
        )
        self.weights: StateDict = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.initial = self.weights if self.algo_cfg.reference == "initial" else None
        self.trained_prev: StateDict = self.weights  # APO's theta_hat of the previous iteration
        return sum(v.numel() for v in self.weights.values())

    def set_weights(self, weights: StateDict, trained_prev: StateDict | None = None) -> None:
        """Resume: replace the current policy (and APO's previous iterate)."""
        self.weights = {k: v.clone() for k, v in weights.items()}
        self.trained_prev = {k: v.clone() for k, v in (trained_prev or weights).items()}

    # ------------------------------------------------------------ models
    def _model(self, weights: StateDict) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(
            self.hf_config, dtype=torch.float32, trust_remote_code=self.trust_remote_code
        )
        model.load_state_dict(weights, strict=False)
        if self.train_cfg.bf16:
            model = model.to(torch.bfloat16)
        return model.to(self.device)

    def sequence_logprobs(self, prompts: list[list[int]], responses: list[list[int]]) -> list[float]:
        """log pi(y|x) of the current policy (used to check weight sync)."""
        model = self._model(self.weights).eval()
        lp, _ = batched_sequence_logprobs(model, prompts, responses, self.pad_id)
        return lp.tolist()

    # ------------------------------------------------------------ training
    def _flatten(self, groups: list[PreferenceGroup]) -> tuple[list[list[int]], list[list[int]]]:
        prompts = [g.prompt_ids for g in groups for _ in g.responses]
        responses = [r for g in groups for r in g.responses]
        return prompts, responses

    def train(self, batch: PreferenceBatch, iteration: int, progress: Ticker | None = None) -> dict:
        """Train one iteration on this rank's shard; returns per-rank metrics (the driver averages).

        Rank 0 counts its optimizer steps on `progress` (every rank runs the same number)."""
        import deepspeed

        shard = shard_for_rank(batch.groups, self.rank, self.world)
        if not shard:
            return {"steps": 0, "trained_pairs": 0}
        k = len(shard[0].responses)
        ref_logps = None
        if self.algorithm.needs_reference:
            ref_weights = self.initial if self.initial is not None else self.weights
            ref_model = self._model(ref_weights).eval()
            ref_logps, _ = batched_sequence_logprobs(ref_model, *self._flatten(shard), self.pad_id)
            ref_logps = ref_logps.view(len(shard), k)
            del ref_model
        model = self._model(self.weights)
        if self.train_cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        engine, *_ = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=ds_config(self.train_cfg, self.world),
        )
        tick = progress if progress is not None and self.rank == 0 else Ticker()
        widths = [len(g.prompt_ids) + max(map(len, g.responses)) for g in shard]
        mb = self.train_cfg.micro_batch_size
        losses: list[float] = []
        stats: dict[str, list[float]] = {}
        for epoch in range(self.train_cfg.epochs):
            rng = random.Random(hash((self.seed, iteration, epoch)))
            for idx in micro_batches(widths, mb, rng, self.train_cfg.group_by_length):
                groups = [shard[i] for i in idx]
                logps, lengths = sequence_logprobs(engine, *self._flatten(groups), self.pad_id)
                inputs = LossInputs(
                    logps=logps.view(len(groups), k),
                    lengths=lengths.view(len(groups), k),
                    rewards=torch.tensor([g.rewards for g in groups], dtype=torch.float32, device=logps.device),
                    ref_logps=ref_logps[idx].to(logps.device) if ref_logps is not None else None,
                )
                if self.algorithm.needs_sft_target and self.algorithm.pair_rule != "ground_truth":
                    sft, sft_len = sequence_logprobs(
                        engine, [g.prompt_ids for g in groups], [g.sft_ids or [] for g in groups], self.pad_id
                    )
                    inputs.sft_logps, inputs.sft_lengths = sft, sft_len
                per_item, item_stats = self.algorithm.loss(inputs, self.algo_cfg)
                loss = per_item.mean()
                engine.backward(loss)
                engine.step()
                tick()
                losses.append(float(loss.detach()))
                for key, val in item_stats.items():
                    stats.setdefault(key, []).extend(val.float().cpu().tolist())
        tick.flush()
        self.weights = self._gather(engine)
        release(engine)
        del engine, model
        out = {"steps": len(losses), "trained_pairs": len(shard), "loss": statistics.fmean(losses)}
        out.update({k: statistics.fmean(v) for k, v in stats.items()})
        if "pair_weight" in stats:
            out["pair_weights"] = stats["pair_weight"][: len(shard)]
        return out

    def _gather(self, engine) -> StateDict:
        """Full fp32 weights on CPU, on every rank (ZeRO-3 gathers each partitioned parameter)."""
        module = engine.module
        if self.train_cfg.zero_stage == 3:
            from deepspeed.runtime.zero import GatheredParameters

            out = {}
            for name, param in module.named_parameters():
                with GatheredParameters([param]):
                    out[name] = param.detach().float().cpu().clone()
            for name, buf in module.named_buffers():
                out[name] = buf.detach().cpu().clone()
        else:
            out = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
        # Tied embeddings share storage: keep the names the checkpoint format expects.
        for key in self.weights:
            if key not in out:
                src = "model.embed_tokens.weight" if key == "lm_head.weight" else key
                out[key] = out[src]
        return {k: out[k] for k in self.weights}

    def extrapolate(self, alpha: float) -> float:
        """APO: theta <- theta_hat + alpha * (theta_hat - theta_hat_prev); returns the step's L2 norm."""
        trained = self.weights
        step_sq = 0.0
        new = {}
        for name, w in trained.items():
            delta = w - self.trained_prev[name]
            step_sq += float((alpha * delta).pow(2).sum())
            new[name] = w + alpha * delta
        self.trained_prev = trained
        self.weights = new
        return step_sq**0.5

    def memory_mb(self) -> dict[str, float]:
        """Resident memory of this rank's process (benchmarks): after start-up (libraries loaded, no model)
        and the peak so far."""
        return {"start": self.rss_start_mb, "peak": _peak_rss_mb()}

    # ------------------------------------------------------------ weights out
    def init_nccl_sync(self, engines: list, world_size: int, dtype: str) -> None:
        """GPU path, rank 0: open vLLM's NCCL weight-transfer group with every engine worker."""
        import ray
        from vllm.distributed.weight_transfer.clients import RayVLLMWeightSyncClient
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        from workers.actor_group import free_port

        info = NCCLTrainerInitInfo(
            master_address=ray.util.get_node_ip_address(), master_port=free_port(), world_size=world_size, rank=0
        )
        source = state_dict_source(self, getattr(torch, dtype), self.device)
        self.nccl_sync = WeightTransferTrainerFactory.trainer_init(
            info, client=RayVLLMWeightSyncClient(engines), source=source
        )

    def send_weights(self) -> None:
        """GPU path, rank 0: packed NCCL broadcast of the current weights into every engine."""
        self.nccl_sync.send_weights()

    def get_weights(self) -> StateDict:
        return self.weights

    def weights_for_sync(self) -> dict:
        """The current weights for the CPU sync path, as zero-copy numpy views (`cpu_transfer.to_wire`)."""
        from workers.cpu_transfer import to_wire

        return to_wire(self.weights)

    def get_trained_prev(self) -> StateDict:
        return self.trained_prev

    def save(self, path: str) -> None:
        """Checkpoint: `path/policy` (HF model dir, safetensors + tokenizer) and APO's previous iterate."""
        if self.rank != 0:
            return
        from safetensors.torch import save_file
        from transformers import AutoTokenizer

        model = self._model(self.weights)
        model.save_pretrained(os.path.join(path, "policy"), safe_serialization=True)
        AutoTokenizer.from_pretrained(self.model_path).save_pretrained(os.path.join(path, "policy"))
        if self.algorithm.extrapolate:
            prev = {k: v.clone().contiguous() for k, v in self.trained_prev.items()}  # untie shared storage
            save_file(prev, os.path.join(path, "apo_prev.safetensors"))

    def load_checkpoint(self, path: str) -> None:
        """Resume from `save`'s layout (safetensors only; no pickle is ever loaded)."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            os.path.join(path, "policy"),
            dtype=torch.float32,
            use_safetensors=True,
            trust_remote_code=self.trust_remote_code,
        )
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        prev = os.path.join(path, "apo_prev.safetensors")
        if os.path.exists(prev):
            from safetensors.torch import load_file

            loaded = load_file(prev)
            trained_prev = {k: loaded.get(k, weights[k]) for k in weights}
        else:
            trained_prev = weights
        self.set_weights(weights, trained_prev)
