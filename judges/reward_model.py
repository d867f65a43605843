"""A local reward model as a pointwise scorer: any `transformers` sequence-classification
model with one output (e.g. a Skywork/ArmoRM-style RM saved as a local folder)."""

from __future__ import annotations

from typing import Sequence

from judges.base import PointwiseItem, Score


class RewardModelScorer:
    name = "reward_model"

    def __init__(self, model: str, batch_size: int = 16, max_length: int = 1024, device: str | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(model).to(self.device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"{model} has {self.model.config.num_labels} outputs; a reward model has exactly 1")
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size, self.max_length = batch_size, max_length

    def _text(self, it: PointwiseItem) -> str:
        messages = [{"role": "user", "content": it.prompt}, {"role": "assistant", "content": it.response}]
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return f"{it.prompt}\n{it.response}"

    def score(self, items: Sequence[PointwiseItem]) -> list[Score]:
        out: list[Score] = []
        for i in range(0, len(items), self.batch_size):
            chunk = items[i : i + self.batch_size]
            enc = self.tokenizer([self._text(it) for it in chunk], return_tensors="pt", padding=True,
                                 truncation=True, max_length=self.max_length).to(self.device)
            with self.torch.no_grad():
                rewards = self.model(**enc).logits[:, 0].float().tolist()
            out += [Score(r) for r in rewards]
        return out
