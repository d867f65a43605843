"""Prompt sources, the train/eval split, and per-round train slices.

A prompt is chat messages plus an optional reference answer (for verifiers). Train
prompts are handed out in fresh, non-overlapping slices per round; the eval prompts
come from a disjoint set of problems and are never trained on (asserted).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from online_dpo.config import DataConfig


class DataError(ValueError):
    """A prompt source that cannot be used; the message says how to fix it."""


@dataclass(frozen=True)
class Prompt:
    id: str
    messages: list[dict] = field(hash=False)
    reference: str | None = None
    group: str = ""  # the underlying problem; the eval split is disjoint on this key

    @property
    def text(self) -> str:
        """The conversation as plain text, as judges see it."""
        if len(self.messages) == 1:
            return self.messages[0]["content"]
        return "\n".join(f"{m['role']}: {m['content']}" for m in self.messages)

    def to_record(self) -> dict:
        return {"id": self.id, "messages": self.messages, "reference": self.reference, "group": self.group}

    @classmethod
    def from_record(cls, rec: dict) -> "Prompt":
        return cls(rec["id"], rec["messages"], rec.get("reference"), rec.get("group", ""))


@dataclass
class PromptSplit:
    train: list[Prompt]
    eval: list[Prompt]

    def __post_init__(self) -> None:
        overlap = {p.group for p in self.train} & {p.group for p in self.eval}
        if overlap:
            raise DataError(f"eval and train share {len(overlap)} problems, e.g. {sorted(overlap)[:3]}")

    def round_prompts(self, round_index: int, per_round: int) -> list[Prompt]:
        """Fresh train prompts for round `round_index` (0-based): never reused across rounds."""
        start, stop = round_index * per_round, (round_index + 1) * per_round
        if stop > len(self.train):
            raise DataError(
                f"round {round_index} needs train prompts {start}..{stop - 1} but the source has "
                f"{len(self.train)}; lower data.train_prompts_per_round or rounds, or use a larger source"
            )
        return self.train[start:stop]


# --- built-in task: arithmetic --------------------------------------------------------

_TEMPLATES = [
    "What is {a} {op} {b}?",
    "Compute {a} {op} {b}.",
    "Calculate {a} {op} {b}. Give the final answer as a number.",
]
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _stable_id(*parts: object) -> str:
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:12]


def arithmetic_split(cfg: DataConfig) -> PromptSplit:
    """Seeded arithmetic prompts. Problems (a, op, b) are split into eval and train sets
    first, then each problem is phrased with every template, so no eval problem is ever
    seen in training in any phrasing."""
    unknown = [op for op in cfg.ops if op not in _OPS]
    if unknown or not cfg.ops:
        raise DataError(f"data.ops {cfg.ops} must be a non-empty subset of {list(_OPS)}")
    if cfg.digits < 1 or cfg.digits > 4:
        raise DataError("data.digits must be between 1 and 4")
    lo = 0 if cfg.digits == 1 else 10 ** (cfg.digits - 1)
    numbers = range(lo, 10**cfg.digits)
    problems = [(a, op, b) for op in cfg.ops for a in numbers for b in numbers]
    rng = random.Random(cfg.seed)
    rng.shuffle(problems)
    n_eval_problems = max(1, round(len(problems) * cfg.eval_fraction))
    eval_problems, train_problems = problems[:n_eval_problems], problems[n_eval_problems:]

    def render(problem_set: list) -> list[Prompt]:
        out = []
        for a, op, b in problem_set:
            group = f"{a}{op}{b}"
            for t, template in enumerate(_TEMPLATES):
                shown_op = "×" if op == "*" else op
                text = template.format(a=a, op=shown_op, b=b)
                out.append(Prompt(_stable_id(cfg.seed, group, t), [{"role": "user", "content": text}],
                                  str(_OPS[op](a, b)), group))
        rng.shuffle(out)
        return out

    eval_prompts = render(eval_problems)[: cfg.eval_prompts]
    return PromptSplit(train=render(train_problems), eval=eval_prompts)


BUILTIN_TASKS = {"arithmetic": arithmetic_split}


def load_prompts(cfg: DataConfig) -> PromptSplit:
    if cfg.source not in BUILTIN_TASKS:
        raise DataError(f"unknown data.source {cfg.source!r}; built-in tasks: {', '.join(BUILTIN_TASKS)}")
    split = BUILTIN_TASKS[cfg.source](cfg)
    if not split.train:
        raise DataError(f"task {cfg.source!r} produced no train prompts; check the data section of the config")
    if not split.eval:
        raise DataError(f"task {cfg.source!r} produced no eval prompts; raise data.eval_prompts or data.eval_fraction")
    return split


def check_prompt_lengths(prompts: list[Prompt], tokenizer, max_prompt_tokens: int) -> None:
    """Reject prompts the model cannot take whole, naming the first offender."""
    for p in prompts:
        n = len(chat_prompt_ids(tokenizer, p.messages))
        if n > max_prompt_tokens:
            raise DataError(
                f"prompt {p.id} is {n} tokens long after the chat template, over "
                f"policy.max_prompt_tokens={max_prompt_tokens}; shorten it or raise the limit"
            )


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` under the chat template, ending with the assistant turn opener.

    Rendered to text first and tokenized without extra special tokens, so generation and
    training see exactly the same ids whatever `apply_chat_template` returns by version.
    """
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
