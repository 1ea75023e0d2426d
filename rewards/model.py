"""`reward.kind: model`: any HF sequence-classification reward model.

The conversation (user prompt, assistant response) goes through the reward model's *own* chat template,
is scored in batches sorted by length (little padding), and the scores come back in input order. fp32
on CPU, bf16 on GPU (as `reward.num_gpus` places it). Weights load from safetensors only; remote code only when the config allows it.
"""

from __future__ import annotations

import torch

from common.batching import length_sorted_batches, right_pad
from common.config import RewardConfig
from common.devices import plan_device


class ModelScorer:
    def __init__(self, cfg: RewardConfig) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = cfg.model_path  # a directory or Hub name: the driver has already built `builtin:tiny-rm`
        self.device = plan_device(cfg.num_gpus, "the reward model (reward.num_gpus)")
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=dtype, use_safetensors=True, trust_remote_code=cfg.trust_remote_code
        ).to(self.device)
        self.model.eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id or self.tokenizer.eos_token_id
        self.batch_size = cfg.batch_size

    def render(self, prompt: str, response: str) -> list[int]:
        """Token ids of the conversation through the reward model's own chat template."""
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        ids = self.tokenizer.apply_chat_template(messages, tokenize=True)
        return list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids)

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str], references: list[str | None]) -> list[float]:
        seqs = [self.render(p, r) for p, r in zip(prompts, responses, strict=True)]
        scores = [0.0] * len(seqs)
        for idx in length_sorted_batches([len(s) for s in seqs], self.batch_size):
            ids, attn = right_pad([seqs[i] for i in idx], self.model.config.pad_token_id)
            logits = self.model(input_ids=ids.to(self.device), attention_mask=attn.to(self.device)).logits
            for row, i in enumerate(idx):
                scores[i] = float(logits[row, 0].float())
        return scores
