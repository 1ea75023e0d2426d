"""Prompt sets: load, validate, render once through the policy's chat template to token ids."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from common.config import BUILTIN_ARITHMETIC_TASK, BUILTIN_TASK, DataConfig
from common.errors import DataError
from pipeline.builtin_task import make_arithmetic_examples, make_examples


@dataclass
class PromptSet:
    texts: list[str]
    references: list[str | None]
    prompt_ids: list[list[int]] = field(default_factory=list)
    sft_ids: list[list[int] | None] = field(default_factory=list)
    counts: dict = field(default_factory=dict)  # filtering counters for the report

    def as_dict(self) -> dict:
        return asdict(self)

    def __len__(self) -> int:
        return len(self.texts)


def _ids(rendered) -> list[int]:
    return list(rendered["input_ids"]) if hasattr(rendered, "keys") else list(rendered)


def target_ids(tokenizer, messages: list[dict], prompt: list[int], response: str) -> list[int]:
    """The ground-truth response as the model should generate it: its tokens as the chat template renders
    the assistant turn, up to and including the template's end-of-turn token (Llama-3 ends turns with
    <|eot_id|> while its eos_token is <|end_of_text|>; ChatML with <|im_end|>). Falls back to the
    response's tokens + eos when the template does not render the turn after the generation prompt.
    `prompt` is `messages` rendered with the generation prompt (untruncated)."""
    full = _ids(tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": response}]))
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    if full[: len(prompt)] == prompt:
        turn = full[len(prompt) :]
        for i, tok in enumerate(turn):
            if tok in special and tokenizer.decode(turn[:i]).strip() == response.strip():
                return turn[: i + 1]
    return tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def render(rows: list[dict], tokenizer, cfg: DataConfig, where: str) -> PromptSet:
    """Chat-template each prompt once; apply the length, empty and duplicate policies; count them."""
    counts = {"empty_prompts": 0, "duplicate_prompts": 0, "long_prompts_skipped": 0, "long_prompts_truncated": 0}
    seen: set[str] = set()
    out = PromptSet([], [])
    for row in rows:
        text, ref = row["prompt"], row.get("response")
        if not text or not text.strip():
            counts["empty_prompts"] += 1
            continue
        key = repr(row.get("messages") or text)
        if key in seen and cfg.duplicate_prompts == "drop":
            counts["duplicate_prompts"] += 1
            continue
        seen.add(key)
        messages = row.get("messages") or [{"role": "user", "content": text}]
        rendered = ids = _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        if cfg.max_prompt_length is not None and len(ids) > cfg.max_prompt_length:
            if cfg.long_prompts == "skip":
                counts["long_prompts_skipped"] += 1
                continue
            counts["long_prompts_truncated"] += 1
            ids = ids[-cfg.max_prompt_length :]  # keep the end: the generation prompt must stay
        out.texts.append(text)
        out.references.append(ref)
        out.prompt_ids.append(ids)
        out.sft_ids.append(None if ref is None else target_ids(tokenizer, messages, rendered, ref))
    out.counts = counts
    if not out.texts:
        hint = "check the data file"
        if counts["long_prompts_skipped"]:
            hint = (
                f"{counts['long_prompts_skipped']} rendered prompts are longer than data.max_prompt_length="
                f"{cfg.max_prompt_length} tokens: raise it (with rollout.max_model_len), or set data.long_prompts=truncate"
            )
        raise DataError(f"{where}: no usable prompts are left after filtering ({counts}); {hint}")
    return out


def load_prompt_sets(cfg: DataConfig, tokenizer, seed: int) -> tuple[PromptSet, PromptSet]:
    """Train and eval prompt sets, rendered."""
    if cfg.train == BUILTIN_TASK:
        train_rows, eval_rows = make_examples(cfg.num_train_prompts, cfg.num_eval_prompts, seed=1234 + seed)
    elif cfg.train == BUILTIN_ARITHMETIC_TASK:
        try:
            train_rows, eval_rows = make_arithmetic_examples(cfg.num_train_prompts, cfg.num_eval_prompts, 1234 + seed)
        except ValueError as e:
            raise DataError(f"data.train={BUILTIN_ARITHMETIC_TASK}: {e}") from None
    else:
        from pipeline.datasets_io import load_rows

        train_rows, eval_rows = load_rows(cfg, seed)
    return render(train_rows, tokenizer, cfg, "data.train"), render(eval_rows, tokenizer, cfg, "data.eval")
