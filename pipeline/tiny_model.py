"""Build the tiny offline policy: byte-level BPE tokenizer + Qwen2 model + a brief SFT warm start.

Nothing is downloaded. The result is an ordinary HF model directory (safetensors, tokenizer, chat
template) cached under `$ONALIGN_CACHE` (default `~/.cache/onalign`), keyed by the build options, and
written atomically so concurrent builders never see half a model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
from pathlib import Path

from pipeline.builtin_task import make_examples, make_words
from pipeline.cache import cache_root, cached_build

BUILDER_VERSION = 4  # 4: built on one thread with deterministic kernels
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@contextlib.contextmanager
def reproducible_build(seed: int):
    """Build on one thread with deterministic kernels and a fixed seed, then restore the settings.

    What a build computes then does not depend on the machine's core count (a different thread count
    changes the order of floating-point sums, and a few hundred training steps amplify it); CPU kernels
    that differ between machines (AVX2 / AVX-512) can still move results slightly, which the tests'
    margins allow for."""
    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _build_tokenizer(seed: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rows, _ = make_examples(2000, 0, seed=seed + 7)
    corpus = []
    for r in rows:
        corpus.append(f"<|im_start|>user\n{r['prompt']}<|im_end|>\n<|im_start|>assistant\n{r['response']}<|im_end|>\n")
    corpus += [" ".join(make_words(12, seed + i)) for i in range(200)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its bar printed blank lines on stdout, before the path `build-model` prints
    )
    tok.train_from_iterator(corpus, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def _sft(model, tokenizer, steps: int, seed: int) -> float:
    """Brief supervised warm start on ground-truth answers (loss on response tokens only)."""
    import torch

    train, _ = make_examples(2048, 0, seed=seed + 99)  # disjoint seed from the run's prompt sets
    torch.manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    model.train()
    loss_val = float("nan")
    for _ in range(steps):
        batch = rng.sample(train, 32)
        seqs, masks = [], []
        for r in batch:
            p = tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True)
            p = list(p["input_ids"]) if hasattr(p, "keys") else list(p)
            resp = tokenizer(r["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            seqs.append(p + resp)
            masks.append([0] * len(p) + [1] * len(resp))
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
        lab = torch.full((len(seqs), width), -100)
        att = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (s, m) in enumerate(zip(seqs, masks, strict=True)):
            ids[i, : len(s)] = torch.tensor(s)
            att[i, : len(s)] = 1
            lab[i, : len(s)] = torch.where(torch.tensor(m, dtype=torch.bool), torch.tensor(s), -100)
        loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_val = float(loss.detach())
    model.eval()
    return loss_val


def build_tiny_model(out_dir: Path, hidden: int = 128, layers: int = 2, sft_steps: int = 140, seed: int = 0) -> dict:
    """Write tokenizer + SFT-warmed Qwen2 policy into `out_dir`; returns build info."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = _build_tokenizer(seed)
    head_dim = 64  # vLLM's CPU attention rejects head_dim 16; 64 works
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // head_dim,
        num_key_value_heads=1,
        head_dim=head_dim,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    final_loss = _sft(model, tokenizer, sft_steps, seed) if sft_steps else float("nan")
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    info = {"params": sum(p.numel() for p in model.parameters()), "sft_steps": sft_steps, "sft_loss": final_loss}
    (out_dir / "onalign_build.json").write_text(json.dumps(info))
    return info


def tiny_model_path(hidden: int = 128, layers: int = 2, sft_steps: int = 140, seed: int = 0) -> Path:
    """Path of the cached tiny model, building it first if needed."""
    key = json.dumps([BUILDER_VERSION, hidden, layers, sft_steps, seed])
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    final = cache_root() / f"tiny-qwen2-h{hidden}-l{layers}-sft{sft_steps}-{digest}"

    def build(tmp: Path) -> dict:
        with reproducible_build(seed):
            return build_tiny_model(tmp, hidden, layers, sft_steps, seed)

    return cached_build(final, build)
