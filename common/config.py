"""The one validated configuration tree of a run.

Loaded from YAML, then `a.b=c` overrides from the command line. Unknown keys are errors that
suggest the closest valid key; wrong types and ranges name the key and what is allowed. Every
check here runs before any Ray actor starts.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    field_validator,
    model_validator,
)

from common.errors import OnalignError
from common.methods import METHODS

BUILTIN_MODEL = "builtin:tiny"
BUILTIN_TASK = "builtin:reverse"
BUILTIN_ARITHMETIC_TASK = "builtin:arithmetic"  # "What is a + b?" for a real chat model (SmolLM2)
BUILTIN_SMOLLM2 = "builtin:smollm2-135m-instruct"  # SmolLM2-135M-Instruct, fetched from PyPI and converted once
BUILTIN_REWARD_MODEL = "builtin:tiny-rm"


class ConfigError(OnalignError, ValueError):
    """A user mistake in the config: the message names the key and the fix."""


def _numeric(annotation) -> bool:
    """Whether a field takes numbers (int, float, a Literal of numbers, or one of them or None) and no bool."""
    import types
    import typing

    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Literal:
        return all(isinstance(a, int | float) and not isinstance(a, bool) for a in args)
    if args and typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        return bool(kinds) and all(_numeric(a) for a in kinds)
    return annotation in (int, float)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, value: Any, info):
        """pydantic's lax mode reads `iterations: true` as 1: a boolean where a number belongs is a mistake."""
        if isinstance(value, bool) and _numeric(cls.model_fields[info.field_name].annotation):
            from pydantic_core import PydanticCustomError

            raise PydanticCustomError("bool_for_number", "expects a number, got the boolean {value}", {"value": value})
        return value


class ModelConfig(_Section):
    # `builtin:tiny` builds the tiny Qwen2 policy offline (cached); otherwise an HF model directory or hub name.
    path: str = BUILTIN_MODEL
    # Tiny-model options (ignored for other paths).
    tiny_hidden_size: int = Field(128, ge=64)
    tiny_layers: int = Field(2, ge=1)
    sft_steps: int = Field(140, ge=0)
    dtype: Literal["float32", "bfloat16"] = "float32"
    trust_remote_code: bool = False


class DataConfig(_Section):
    # `builtin:reverse` is the built-in verifiable task; otherwise a local file/dir or hub dataset name.
    train: str = BUILTIN_TASK
    eval: str | None = None
    split: str = "train"
    subset: str | None = None
    revision: str | None = None
    # Column mapping: which column holds the prompt / the ground-truth response / chat messages.
    prompt_column: str = "prompt"
    response_column: str = "response"
    messages_column: str = "messages"
    num_train_prompts: int = Field(256, ge=1)
    num_eval_prompts: int = Field(64, ge=1)
    max_samples: int | None = Field(None, ge=1)
    # Longest rendered prompt (chat template and system turn included); default: what the engine's context
    # leaves beside the response, rollout.max_model_len - rollout.max_new_tokens.
    max_prompt_length: int | None = Field(None, ge=4)
    long_prompts: Literal["skip", "truncate"] = "skip"
    # None: the same prompt set every iteration (SPIN, OPTune). N: iteration k takes the k-th slice of N
    # prompts of the shuffled train set, wrapping around (RLHFlow's fresh prompts per iteration).
    prompts_per_iteration: int | None = Field(None, ge=1)
    duplicate_prompts: Literal["drop", "keep"] = "drop"


class RolloutConfig(_Section):
    num_engines: int = Field(1, ge=1)
    tensor_parallel_size: int = Field(1, ge=1)
    n_samples: int = Field(4, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(16, ge=1)
    max_model_len: int = Field(256, ge=16)
    num_cpus: float = Field(1.0, ge=0.0)
    num_gpus: float = Field(0.0, ge=0.0)
    # Ray custom resources each engine asks for (e.g. {"engine_node": 1}: only nodes started with
    # `ray start --resources '{"engine_node": 1}'` take engines).
    resources: dict[str, NonNegativeFloat] = {}
    gpu_memory_utilization: float = Field(0.5, gt=0.0, le=1.0)
    kv_cache_mb: int = Field(256, ge=16)
    # CPU engines: torch threads of each engine. Default: the node's cores / num_engines, since the
    # loop's stages run one after another (Ray would otherwise give the engine num_cpus threads).
    cpu_threads: int | None = Field(None, ge=1)
    # false: vLLM compiles the model (torch.compile; CUDA graphs on GPU): faster decoding for a slower start
    # (BENCHMARKS.md, "Which levers helped").
    enforce_eager: bool = True
    # The n samples of a prompt share its prompt's KV blocks (vLLM's automatic prefix caching).
    enable_prefix_caching: bool = True
    # CPU engines: LD_PRELOAD tcmalloc (Debian libtcmalloc-minimal4) when installed, as vLLM's CPU backend asks.
    cpu_preload_tcmalloc: bool = True
    # vLLM's scheduler: the sequences an engine decodes together, and the tokens one step may process.
    # Unset: vLLM's defaults (256 sequences per CPU engine, 1024 on H100-class GPUs) and, on CPU, where
    # whole prompts are prefilled, max(8192, max_model_len) tokens.
    max_num_seqs: int | None = Field(None, ge=1)
    max_num_batched_tokens: int | None = Field(None, ge=1)
    # placement=colocate: what the engine frees while the trainers train. 1: the KV cache, and the weights go
    # to CPU memory (restored on waking, then overwritten by the sync); 2: both discarded (no CPU copy, but a
    # buffer the checkpoint does not hold, such as a rotary cache, would not come back).
    sleep_level: Literal[1, 2] = 1

    @model_validator(mode="after")
    def _scheduler_limits_fit(self) -> RolloutConfig:
        tokens = self.max_num_batched_tokens
        if tokens is None:
            return self
        if self.max_num_seqs is not None and tokens < self.max_num_seqs:
            raise ValueError(
                f"rollout.max_num_batched_tokens ({tokens}) must be at least rollout.max_num_seqs "
                f"({self.max_num_seqs}): vLLM schedules a token of every running sequence a step"
            )
        if self.num_gpus == 0 and tokens < self.max_model_len:
            raise ValueError(
                f"rollout.max_num_batched_tokens ({tokens}) must be at least rollout.max_model_len "
                f"({self.max_model_len}) on CPU engines, which prefill whole prompts (chunked prefill off): "
                "raise it or lower max_model_len"
            )
        return self


class RewardConfig(_Section):
    kind: Literal["function", "model", "remote"] = "function"
    # `module:function` for kind=function.
    function: str = "rewards.functions:reverse_reward"
    # An HF sequence-classification model dir/hub name, or `builtin:tiny-rm` (built offline for tests).
    model_path: str | None = None
    trust_remote_code: bool = False
    url: str | None = None
    timeout_s: float = Field(30.0, gt=0)
    retries: int = Field(2, ge=0)
    batch_size: int = Field(32, ge=1)
    # Added to the reward of a response cut at max_new_tokens without EOS (TRL's missing_eos_penalty).
    missing_eos_penalty: float | None = None
    num_cpus: float = Field(0.0, ge=0.0)
    num_gpus: float = Field(0.0, ge=0.0)
    resources: dict[str, NonNegativeFloat] = {}  # Ray custom resources of the reward actor (see rollout.resources)

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is None:
            return url
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
        except ValueError as e:
            raise ValueError(f"reward.url '{url}' is not a valid URL ({e})") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"reward.url '{url}' must be an http:// or https:// URL with a host, e.g. http://localhost:8000/score"
            )
        return url


class SelectionConfig(_Section):
    """OPTune (arXiv 2406.07657) low-reward prompt selection."""

    mode: Literal["all", "lowest_reward", "random"] = "all"
    rho: float = Field(1.0, gt=0.0, le=1.0)
    score: Literal["best_reward", "pair_mean"] = "best_reward"


class AlgorithmConfig(_Section):
    # A method of the registry in common/methods.py (dpo, ipo, slic, rrhf, wdpo, spin, apo).
    name: str = "dpo"
    # initial: RLHFlow-style fixed reference; previous: the iteration's starting policy (SPIN and APO
    # require it: their papers define the reference as the previous iterate).
    reference: Literal["initial", "previous"] = "previous"
    # current: a regenerated prompt's group is built from this iteration's samples only (on-policy, as the
    # papers train); all: from every sample the prompt has had so far (off-policy, kept as an option).
    pair_pool: Literal["current", "all"] = "current"
    beta: float = Field(0.1, gt=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    # Per-token NLL of the chosen response added to pair losses (Iterative RPO, arXiv 2404.19733).
    nll_coef: float = Field(0.0, ge=0.0)
    # wdpo (OPTune): weight g(wdpo_beta2 * (r_chosen - r_rejected)).
    wdpo_beta2: float = Field(1.0, ge=0.0)
    wdpo_weight_fn: Literal["exp", "sigmoid", "linear"] = "exp"
    wdpo_normalize_weights: bool = True
    # slic (SLiC-HF, arXiv 2305.10425): hinge margin delta and regulariser lambda on the SFT target.
    slic_delta: float = Field(1.0, gt=0.0)
    slic_lambda: float = Field(0.1, ge=0.0)
    # rrhf (arXiv 2304.05302): weight of the NLL of the best response.
    rrhf_sft_weight: float = Field(1.0, ge=0.0)
    # spin (arXiv 2401.01335): train on this iteration's pairs plus the previous iteration's (the paper's recipe).
    spin_mix_previous: bool = True
    # apo (arXiv 2410.06293): Nesterov extrapolation theta + alpha * (theta - theta_prev).
    apo_alpha: float = Field(0.3, ge=0.0)


class TrainConfig(_Section):
    num_workers: int = Field(2, ge=1)
    zero_stage: Literal[2, 3] = 2
    lr: float = Field(5e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    epochs: int = Field(2, ge=1)
    micro_batch_size: int = Field(16, ge=1)
    # Cut micro-batches from length-sorted windows (little padding; batch order stays random).
    group_by_length: bool = True
    grad_clip: float = Field(1.0, gt=0.0)
    num_cpus: float = Field(0.5, ge=0.0)
    num_gpus: float = Field(0.0, ge=0.0)
    resources: dict[str, NonNegativeFloat] = {}  # Ray custom resources of each trainer rank (see rollout.resources)
    bf16: bool = False
    # Reference log-probs of responses that the reference policy itself sampled (reference = previous
    # iterate, samples of this iteration): "rollout" takes the engine's own sampled-token log-probs (no
    # reference forward pass for them); "forward" recomputes every one; "auto" is "rollout" where the two were
    # verified to agree (fp32 engine and trainer on CPU) and "forward" elsewhere (bf16, GPU kernels).
    reference_logps: Literal["auto", "rollout", "forward"] = "auto"
    # Recompute each decoder layer in the backward pass instead of keeping its activations: less memory for
    # more time (BENCHMARKS.md, "Where the trainer's memory and time go").
    gradient_checkpointing: bool = False
    # Bin-pack each micro-batch's sequences into rows (position ids restarting per sequence, attention kept
    # inside each by HF's masking): no padding between them (BENCHMARKS.md, "Which levers helped"). Checked
    # once per run against the padded path; a model that disagrees trains padded, with a warning.
    packing: bool = False
    # CPU trainers: tcmalloc preloaded when installed (faster than glibc's heap). For a run short of memory
    # instead (the memory setting, with gradient_checkpointing): cpu_preload_tcmalloc false and
    # cpu_mmap_threshold_kib 128, so glibc maps every block of 128 KiB or more on its own and returns it when
    # freed; 0 keeps glibc's default (BENCHMARKS.md, "Where the trainer's memory and time go").
    cpu_preload_tcmalloc: bool = True
    cpu_mmap_threshold_kib: int = Field(0, ge=0, le=32768)  # glibc caps the threshold at 32 MiB
    offload_optimizer: bool = False  # ZeRO optimizer state in CPU memory
    offload_params: bool = False  # ZeRO-3 parameters in CPU memory

    @model_validator(mode="after")
    def _glibc_only(self) -> TrainConfig:
        if self.cpu_mmap_threshold_kib and self.cpu_preload_tcmalloc:
            raise ValueError(
                "train.cpu_mmap_threshold_kib sets glibc's heap, which a tcmalloc preload replaces: set "
                "train.cpu_preload_tcmalloc=false too (the memory setting), or cpu_mmap_threshold_kib=0"
            )
        return self


# `RunConfig.sync_tolerance`'s defaults (per response token)
SYNC_TOLERANCE_FP32 = 1e-3
SYNC_TOLERANCE_BF16 = 0.1


class SyncConfig(_Section):
    # auto: with placement=colocate, ipc on GPUs (vLLM's CUDA IPC backend: trainer rank and engine share the
    # GPU) and cpu on CPUs; otherwise nccl when both the engines and the trainers have GPUs, else cpu (the
    # object-store backend).
    backend: Literal["auto", "cpu", "nccl", "ipc"] = "auto"
    bucket_mb: int = Field(256, ge=1)
    # The sync proves itself: before each iteration's first optimizer step the trainers' log-probs of responses
    # the engine sampled in that iteration must equal the engine's own (`sync_logp_max_abs_diff`, per token,
    # in metrics.jsonl). Above `check_tolerance` (None: by precision, `sync_tolerance`) the run stops.
    check: bool = True
    check_tolerance: float | None = Field(None, gt=0)


class EvalConfig(_Section):
    temperature: float = Field(0.0, ge=0.0)
    num_examples: int = Field(4, ge=0)


class RunConfig(_Section):
    seed: int = Field(0, ge=0, le=2**32 - 1)  # numpy's and vLLM's seeds are unsigned 32-bit
    iterations: int = Field(3, ge=0)
    output_dir: str = "runs/onalign"

    @field_validator("output_dir")
    @classmethod
    def _output_dir_given(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("output_dir is empty: give the run a directory of its own, e.g. output_dir=runs/mine")
        return value

    # true / "auto": continue after the last complete checkpoint in output_dir (a fresh start if none).
    resume: bool | Literal["auto"] = False
    keep_checkpoints: int = Field(2, ge=1)
    call_timeout_s: float = Field(900.0, gt=0)
    quiet: bool = False
    # Stream the actors' own output (vLLM, DeepSpeed) to the console; by default it goes to OUTPUT_DIR/logs/.
    verbose: bool = False
    tensorboard: bool = True
    # W&B (when installed): offline unless WANDB_MODE=online; files under OUTPUT_DIR/wandb/.
    wandb: bool = False
    wandb_project: str = "onalign"
    ray_num_cpus: int | None = Field(None, ge=1)
    # separate: engines and trainer ranks hold resources of their own. colocate: trainer rank i and engine i
    # share one bundle (one GPU, Ray fractional GPUs: rollout.num_gpus + train.num_gpus <= 1); the engine
    # sleeps (rollout.sleep_level) while the trainers train and wakes for the sync and the next rollout. On
    # CPUs vLLM's sleep is a no-op: the schedule runs, no memory is freed.
    placement: Literal["separate", "colocate"] = "separate"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardConfig = RewardConfig()
    selection: SelectionConfig = SelectionConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    train: TrainConfig = TrainConfig()
    sync: SyncConfig = SyncConfig()
    eval: EvalConfig = EvalConfig()

    def resolved_reference_logps(self) -> Literal["rollout", "forward"]:
        """`train.reference_logps` with "auto" resolved (what the trainers are given; the config keeps "auto")."""
        t = self.train
        if t.reference_logps != "auto":
            return t.reference_logps
        verified = self.model.dtype == "float32" and not t.bf16 and self.rollout.num_gpus == 0 and t.num_gpus == 0
        return "rollout" if verified else "forward"

    def sync_backend(self) -> Literal["cpu", "nccl", "ipc"]:
        """`sync.backend` with `auto` resolved, the one place it is decided: under `placement: colocate`, vLLM's
        CUDA IPC backend on GPUs (the trainer rank and the engine share the GPU) and the CPU path on CPUs;
        otherwise NCCL only when both ends have GPUs (trainer rank 0 is an NCCL rank too), else the CPU
        object-store path."""
        if self.sync.backend != "auto":
            return self.sync.backend
        gpus = self.rollout.num_gpus > 0 and self.train.num_gpus > 0
        if self.placement == "colocate":
            return "ipc" if gpus else "cpu"
        return "nccl" if gpus else "cpu"

    def sync_tolerance(self) -> float:
        """The largest per-token log-prob gap between engine and trainers that a working sync leaves:
        `sync.check_tolerance`, else by precision (fp32 both sides: numerics only; bf16 on either: vLLM's and
        HF's bf16 kernels round differently)."""
        if self.sync.check_tolerance is not None:
            return self.sync.check_tolerance
        return SYNC_TOLERANCE_FP32 if self.model.dtype == "float32" and not self.train.bf16 else SYNC_TOLERANCE_BF16

    @model_validator(mode="after")
    def _cross_checks(self) -> RunConfig:
        a, r = self.algorithm, self.rollout
        method = METHODS.get(a.name)
        if method is None:
            close = difflib.get_close_matches(a.name, list(METHODS), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ValueError(
                f"algorithm.name '{a.name}' is not a registered method. {hint}Choose one of: {', '.join(METHODS)}"
            )
        if r.n_samples < method.min_samples:
            raise ValueError(
                f"rollout.n_samples: algorithm '{a.name}' needs at least {method.min_samples} samples per prompt "
                f"(got {r.n_samples}); set rollout.n_samples=4"
            )
        if method.max_samples is not None and r.n_samples > method.max_samples:
            raise ValueError(
                f"rollout.n_samples: algorithm '{a.name}' pairs the ground truth with {method.max_samples} own "
                f"generation per prompt, as its paper does (got {r.n_samples}); set rollout.n_samples={method.max_samples}"
            )
        if method.min_samples >= 2 and r.temperature == 0:
            raise ValueError(
                f"rollout.temperature=0: greedy decoding gives {a.name} identical samples, so no pair could ever be "
                "built and no iteration would train; set rollout.temperature=1.0"
            )
        if method.reference == "none" and a.reference != "previous":
            raise ValueError(f"algorithm.reference={a.reference}: {a.name} uses no reference model; remove the setting")
        if method.reference == "previous" and a.reference != "previous":
            raise ValueError(
                f"algorithm.reference={a.reference}: {a.name}'s reference is the previous iterate by definition; "
                "remove the setting or set algorithm.reference=previous"
            )
        if self.selection.mode == "all" and self.selection.rho != 1.0:
            raise ValueError(
                f"selection.rho={self.selection.rho} has no effect with selection.mode=all; "
                "use selection.mode=lowest_reward (OPTune) or random"
            )
        if method.pairs == "ground_truth" and self.selection.mode != "all" and self.selection.score == "pair_mean":
            raise ValueError(
                f"selection.score=pair_mean with {a.name}: its chosen response is the dataset's ground truth, which "
                "is never scored, so a pair's mean reward says nothing; use selection.score=best_reward"
            )
        if self.data.prompts_per_iteration is not None and self.selection.mode != "all":
            raise ValueError(
                "data.prompts_per_iteration takes fresh prompts every iteration, while OPTune selection "
                f"(selection.mode={self.selection.mode}) re-ranks one fixed prompt set: use one or the other"
            )
        if self.data.eval is not None and self.data.train in (BUILTIN_TASK, BUILTIN_ARITHMETIC_TASK):
            raise ValueError(
                f"data.eval: the built-in task data.train={self.data.train} makes its own held-out prompts "
                "(data.num_eval_prompts of them) and would ignore data.eval; remove data.eval, or give data.train "
                "a data file"
            )
        if self.train.offload_params and self.train.zero_stage != 3:
            raise ValueError("train.offload_params needs train.zero_stage=3 (parameter offload is a ZeRO-3 feature)")
        if self.reward.kind == "model" and not self.reward.model_path:
            raise ValueError("reward.model_path: reward.kind=model needs the path of a sequence-classification model")
        if self.reward.kind == "remote" and not self.reward.url:
            raise ValueError("reward.url: reward.kind=remote needs the scoring endpoint's URL")
        if self.data.max_prompt_length is None:
            if r.max_model_len - r.max_new_tokens < 4:
                raise ValueError(
                    f"rollout.max_model_len={r.max_model_len} leaves no room for a prompt beside "
                    f"rollout.max_new_tokens={r.max_new_tokens}; raise rollout.max_model_len"
                )
            self.data.max_prompt_length = r.max_model_len - r.max_new_tokens
        if self.data.max_prompt_length + r.max_new_tokens > r.max_model_len:
            raise ValueError(
                f"rollout.max_model_len={r.max_model_len} is shorter than data.max_prompt_length "
                f"+ rollout.max_new_tokens = {self.data.max_prompt_length + r.max_new_tokens}"
            )
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
