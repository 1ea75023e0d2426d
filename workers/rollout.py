"""The rollout actor: one vLLM engine, in the actor's own process, sampling from the current policy.

Prompts arrive as token ids (rendered once by the driver), so vLLM and the trainers see the same
tokens. Each of the n samples of a prompt is its own request with its own seed derived from
(run seed, iteration, prompt, sample): runs are reproducible (and resumable) while the samples of a
prompt stay independent (one request with n > 1 and a fixed seed gave correlated samples).
"""

from __future__ import annotations

import collections
import io
import os
import time
from dataclasses import dataclass, field

from common.config import RolloutConfig
from common.devices import hidden_gpus_env
from common.records import Rollout
from common.ticker import Ticker
from workers import collector
from workers.heap import tcmalloc_preload

# Keep the engine core inside this process (what a Ray actor wants), and keep it offline.
ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_LOGGING_LEVEL": "WARNING",
    "TRANSFORMERS_VERBOSITY": "error",
}


def engine_env(rc: RolloutConfig) -> dict[str, str]:
    """The engine actor's environment: ENGINE_ENV, plus, for a CPU engine, no visible GPU and tcmalloc in
    LD_PRELOAD when it is
    installed (vLLM's CPU backend warns at every start without it; a preload must be in the environment the
    process starts with, hence here). Intel OpenMP, which vLLM also suggests, is left out: bench/levers.py
    measured no consistent gain from it (docs/perf-history.md), and it puts a second OpenMP runtime beside
    torch's in the process."""
    env = ENGINE_ENV | hidden_gpus_env(rc.num_gpus)
    if rc.num_gpus == 0 and rc.cpu_preload_tcmalloc:
        env.update(tcmalloc_preload())
    return env


def response_text_ids(completion) -> list[int]:
    """The token ids whose text vLLM would give for a completion: without the EOS or stop token that ended
    it (vLLM leaves that token's text out even when it is not a special token)."""
    ids = list(completion.token_ids)
    return ids[:-1] if completion.finish_reason == "stop" and ids else ids


def sample_seed(seed: int, iteration: int, prompt_index: int, sample: int) -> int:
    return (seed * 1_000_003 + iteration * 10_007 + prompt_index * 101 + sample) % (2**31 - 1)


def counting_tqdm(tick: Ticker):
    """A tqdm class for vLLM's `use_tqdm` that draws nowhere and forwards each finished request to `tick`."""
    from tqdm import tqdm

    class CountingTqdm(tqdm):
        def __init__(self, *args, **kwargs) -> None:
            # vLLM also wraps the prompts it renders (an iterable): only the finished-requests bar counts
            self.counts = not args and kwargs.get("iterable") is None
            kwargs["file"] = io.StringIO()
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if self.counts:
                tick(int(n or 0))
            return super().update(n)

    return CountingTqdm


def cpu_batched_tokens(rc: RolloutConfig) -> int:
    """A CPU engine's token budget per step: the configured one, else enough for a whole prompt (chunked
    prefill is off) and for one token of every sequence, and at least 8192."""
    return rc.max_num_batched_tokens or max(8192, rc.max_model_len, rc.max_num_seqs or 0)


@dataclass
class EngineSettings:
    """How one engine is built, decided from the plan alone (`rollout.num_gpus`), never from what torch sees."""

    on_gpu: bool
    kwargs: dict = field(default_factory=dict)  # for vLLM's `LLM(...)`, beside the model and the rollout section


def engine_settings(rc: RolloutConfig, sync_backend: str, colocated: bool = False) -> EngineSettings:
    """vLLM's settings for an engine of the plan: its weight-transfer backend, sleep mode when it shares its
    GPU with a trainer rank, and its memory and scheduler settings for a CPU or a GPU engine."""
    on_gpu = rc.num_gpus > 0
    backend = sync_backend if sync_backend in ("nccl", "ipc") else _cpu_backend()
    kwargs: dict = {"weight_transfer_config": {"backend": backend}}
    if colocated and on_gpu:
        kwargs["enable_sleep_mode"] = True  # CPU engines have no sleep mode (vLLM refuses the setting there)
    if not on_gpu:
        kwargs["kv_cache_memory_bytes"] = int(rc.kv_cache_mb) * 2**20
        # Chunked prefill rewinds seeded samplers with Generator.set_offset, which CPU generators lack
        # ("CPU Generator does not use offset"): prefill whole prompts instead.
        kwargs["enable_chunked_prefill"] = False
        kwargs["max_num_batched_tokens"] = cpu_batched_tokens(rc)
    else:
        if rc.max_num_batched_tokens is not None:
            kwargs["max_num_batched_tokens"] = rc.max_num_batched_tokens
        kwargs["gpu_memory_utilization"] = rc.gpu_memory_utilization
        if rc.tensor_parallel_size > 1:
            kwargs["distributed_executor_backend"] = "ray"  # TP workers in this actor's placement group
    return EngineSettings(on_gpu, kwargs)


def _cpu_backend() -> str:
    """The CPU object-store backend (also for GPU engines fed by CPU trainers), registered in this process."""
    from workers import cpu_transfer

    cpu_transfer.register()
    return cpu_transfer.BACKEND


class RolloutWorker:
    def __init__(
        self,
        model_path: str,
        rollout_cfg: RolloutConfig | dict,
        dtype: str = "float32",
        seed: int = 0,
        sync_backend: str = "cpu",
        colocated: bool = False,
    ) -> None:
        os.environ.update(ENGINE_ENV)
        rc = RolloutConfig.model_validate(rollout_cfg)  # the validated section (a dict is accepted too)
        import torch
        from vllm import LLM

        collector.freeze_long_lived()  # vLLM's imports: its start-up collections then skip them
        settings = engine_settings(rc, sync_backend, colocated)
        if not settings.on_gpu:
            # before vLLM pins the thread count; Ray set it to the actor's num_cpus
            torch.set_num_threads(rc.cpu_threads or max(1, (os.cpu_count() or 1) // rc.num_engines))
        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            max_model_len=rc.max_model_len,
            tensor_parallel_size=rc.tensor_parallel_size,
            enforce_eager=rc.enforce_eager,
            seed=seed,
            enable_prefix_caching=rc.enable_prefix_caching,
            max_num_seqs=rc.max_num_seqs,  # None: vLLM's default for the platform
            **settings.kwargs,
        )
        if sync_backend == "cpu":
            self.llm.init_weight_transfer_engine({"init_info": {}})  # no rendezvous: the object store
        self.asleep: set[str] = set()  # what `sleep` released and no `wake_up` has brought back yet
        self.events: collections.deque[tuple[float, str]] = collections.deque(maxlen=1000)
        collector.freeze_long_lived()  # and what building the engine imported and made

    def _event(self, name: str) -> None:
        self.events.append((time.monotonic(), name))

    def lifecycle(self) -> list[tuple[float, str]]:
        """The engine's recent lifecycle calls (generate, sleep, wake_up, weight updates), with the time of each
        (`time.monotonic()`: comparable between processes of one machine)."""
        return list(self.events)

    def _require_awake(self, what: str, tags: tuple[str, ...]) -> None:
        asleep = self.asleep.intersection(tags)
        if asleep:
            raise RuntimeError(
                f"{what} while the engine's {' and '.join(sorted(asleep))} sleep: wake_up first (placement=colocate "
                "order: sleep, train, wake weights, update, wake KV cache, generate)"
            )

    # ------------------------------------------------------------ colocation: vLLM's sleep mode
    def sleep(self, level: int = 1) -> None:
        """Free the GPU for the trainers (placement=colocate): level 1 discards the KV cache and offloads the
        weights to CPU memory, level 2 discards both. On CPU engines vLLM only pauses scheduling (no memory
        is freed), so the same order runs there."""
        self.llm.sleep(level=level)
        self.asleep = {"weights", "kv_cache"}
        self._event(f"sleep({level})")

    def wake_up(self, tags: list[str]) -> None:
        """Bring back `tags` ("weights" before a weight update, "kv_cache" before generating)."""
        self.llm.wake_up(tags)
        self.asleep -= set(tags)
        self._event(f"wake_up({','.join(tags)})")

    def scheduler_limits(self) -> dict[str, int]:
        """The sequences this engine decodes together and the tokens a step may process, as vLLM set them."""
        sched = self.llm.llm_engine.vllm_config.scheduler_config
        return {"max_num_seqs": sched.max_num_seqs, "max_num_batched_tokens": sched.max_num_batched_tokens}

    def generate(
        self,
        prompt_ids: list[list[int]],
        prompt_indices: list[int],
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int,
        iteration: int,
        progress: Ticker | None = None,
    ) -> list[Rollout]:
        """n samples per prompt, one request each; temperature 0 gives one greedy answer per prompt.

        `progress` counts finished responses (the driver's progress bar)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._require_awake("generate", ("weights", "kv_cache"))
        self._event("generate")
        requests, params, owners = [], [], []
        for ids, idx in zip(prompt_ids, prompt_indices, strict=True):
            for j in range(n if temperature > 0 else 1):
                requests.append(TokensPrompt(prompt_token_ids=ids))
                params.append(
                    SamplingParams(
                        n=1,
                        temperature=temperature,
                        top_p=top_p,
                        max_tokens=max_new_tokens,
                        seed=sample_seed(seed, iteration, idx, j),
                        logprobs=0,
                        detokenize=False,  # decoded once below, not token by token in the engine loop
                    )
                )
                owners.append(idx)
        with progress or Ticker() as tick:
            bar = counting_tqdm(tick) if progress is not None else False
            outputs = self.llm.generate(requests, params, use_tqdm=bar)
        texts = self.llm.get_tokenizer().batch_decode(
            [response_text_ids(out.outputs[0]) for out in outputs],
            skip_special_tokens=True,
            clean_up_tokenization_spaces=False,  # as vLLM's own incremental detokenizer
        )
        rollouts = []
        for idx, out, text in zip(owners, outputs, texts, strict=True):
            o = out.outputs[0]
            rollouts.append(
                Rollout(
                    prompt_index=idx,
                    response_ids=list(o.token_ids),
                    text=text,
                    finish_reason="length" if o.finish_reason == "length" else "stop",
                    sample_logprob=o.cumulative_logprob,
                )
            )
        return rollouts

    def response_logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[float]:
        """log pi(y|x) summed over response tokens as the engine computes it (prompt_logprobs)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        reqs = [TokensPrompt(prompt_token_ids=p + r) for p, r in zip(prompt_ids, response_ids, strict=True)]
        outs = self.llm.generate(reqs, params, use_tqdm=False)
        totals = []
        for p, r, out in zip(prompt_ids, response_ids, outs, strict=True):
            entries = out.prompt_logprobs
            total = 0.0
            for pos in range(len(p), len(p) + len(r)):
                total += entries[pos][r[pos - len(p)]].logprob
            totals.append(total)
        return totals

    # vLLM's weight-transfer lifecycle, exposed for `RayVLLMWeightSyncClient` (the GPU/NCCL path).
    def init_weight_transfer_engine(self, request) -> None:
        self.llm.init_weight_transfer_engine(request)

    def start_weight_update(self) -> None:
        # under sleep level 1 an update into offloaded weights would be overwritten by their copy on waking
        self._require_awake("a weight update", ("weights",))
        self._event("start_weight_update")
        self.llm.start_weight_update()

    def update_weights(self, request) -> None:
        self.llm.update_weights(request)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        """End the update; `weight_version` labels the weights now loaded (`weight_version()` reads it back)."""
        self.llm.finish_weight_update(weight_version)
        self._event("finish_weight_update")
        if "kv_cache" not in self.asleep:
            self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights (asleep: none kept)

    def shutdown_weight_transfer_engine(self) -> None:
        """Release the trainer connection (the NCCL group) without stopping the engine."""
        self.llm.shutdown_weight_transfer_engine()

    def update_weight_version(self, weight_version: str) -> None:
        self.llm.update_weight_version(weight_version)

    def weight_version(self) -> str | None:
        """The label of the weights this engine samples from (set by the last update)."""
        return self.llm.get_weight_version()

    def load_weights(self, wire: dict, bucket_mb: int = 256) -> int:
        """CPU sync path: HF-named tensors (`cpu_transfer.to_wire` form), bucketed, through the same
        lifecycle (`onalign_cpu` backend)."""
        from workers.cpu_transfer import buckets, from_wire

        named_tensors = from_wire(wire)
        self.start_weight_update()
        for names, tensors in buckets(named_tensors, bucket_mb * 2**20):
            self.update_weights({"update_info": {"names": names, "tensors": tensors}})
        self.finish_weight_update()
        return len(named_tensors)

    def ready(self) -> bool:
        return True
