"""Prompts and the train/eval split: a prompt's messages, reference and group, the split's
per-round train slices, what loading read and skipped, and a prompt's token ids."""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass, field

from online_dpo.errors import DataError


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
    def from_record(cls, rec: dict) -> Prompt:
        return cls(rec["id"], rec["messages"], rec.get("reference"), rec.get("group", ""))


@dataclass
class SourceReport:
    """What loading the prompts read, skipped and kept; saved as the run's data.json."""

    source: str
    eval_source: str | None = None
    rows_read: int = 0  # rows (or generated prompts) of data.source
    eval_rows_read: int = 0  # rows of data.eval_source, when given
    empty_skipped: int = 0  # rows whose prompt is missing or blank
    duplicates_skipped: int = 0  # same normalized prompt as an earlier row
    too_long_skipped: int = 0  # over policy.max_prompt_tokens after the chat template
    eval_overlap_skipped: int = 0  # train prompts that are also in data.eval_source
    train: int = 0
    eval: int = 0
    max_prompt_tokens: int | None = None
    longest_prompt_tokens: int | None = None  # among the prompts kept
    examples: list[dict] = field(default_factory=list)  # a few skipped rows, with the reason

    MAX_EXAMPLES = 10

    def skipped(self, reason: str, where: str, prompt_text: str = "") -> None:
        if len(self.examples) < self.MAX_EXAMPLES:
            self.examples.append({"reason": reason, "where": where, "prompt": prompt_text[:120]})

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        read = f"{self.rows_read} rows" + (f" (+{self.eval_rows_read} eval rows)" if self.eval_source else "")
        skips = [f"{n} {what}" for n, what in [
            (self.empty_skipped, "empty"), (self.duplicates_skipped, "duplicate"),
            (self.too_long_skipped, "too long"), (self.eval_overlap_skipped, "in the eval source")] if n]
        skipped = f", skipped {', '.join(skips)}" if skips else ""
        return f"prompts from {self.source}: {read}{skipped} -> {self.train} train, {self.eval} eval"


@dataclass
class PromptSplit:
    train: list[Prompt]
    eval: list[Prompt]
    when_exhausted: str = "error"  # or "reshuffle": see `round_prompts`
    seed: int = 0  # seeds the reshuffled passes
    report: SourceReport | None = None

    def __post_init__(self) -> None:
        overlap = {p.group for p in self.train} & {p.group for p in self.eval}
        if overlap:
            raise DataError(f"eval and train share {len(overlap)} problems, e.g. {sorted(overlap)[:3]}")
        for name, prompts in (("train", self.train), ("eval", self.eval)):
            if len({p.id for p in prompts}) != len(prompts):  # ids key candidates and judgments
                raise DataError(f"the {name} prompts have repeated ids")

    def round_prompts(self, round_index: int, per_round: int) -> list[Prompt]:
        """Fresh train prompts for round `round_index` (0-based).

        "error": slice r of the train list; never reused across rounds, and an error
        once the list runs out. "reshuffle": pass 0 is the train list in order; when
        a round needs more prompts than the current pass has left, the rest of it is
        dropped and pass k starts: the train list permuted by a seed of (data.seed, k).
        No prompt repeats within a pass, so none within a round.
        """
        n = len(self.train)
        if self.when_exhausted == "reshuffle":
            if per_round > n:
                raise DataError(f"a round needs {per_round} train prompts but the source has {n}; "
                                f"lower data.train_prompts_per_round or use a larger source")
            rounds_per_pass = n // per_round
            pass_index, slot = divmod(round_index, rounds_per_pass)
            order = self.train
            if pass_index > 0:
                order = list(self.train)
                random.Random(f"{self.seed}:pass:{pass_index}").shuffle(order)  # str seeds hash stably
            return order[slot * per_round : (slot + 1) * per_round]
        start, stop = round_index * per_round, (round_index + 1) * per_round
        if stop > n:
            raise DataError(
                f"round {round_index} needs train prompts {start}..{stop - 1} but the source has "
                f"{n}; lower data.train_prompts_per_round or rounds, use a larger source, or set "
                f"data.when_exhausted=reshuffle to start a new pass over the prompts"
            )
        return self.train[start:stop]


def stable_id(*parts: object) -> str:
    """A content hash: the same prompt gets the same id in every process."""
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:12]


def prompt_lengths(prompts: list[Prompt], tokenizer) -> list[int]:
    """Token counts under the chat template, as `chat_prompt_ids` counts them (one batched call)."""
    if not prompts:
        return []
    texts = [tokenizer.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=False) for p in prompts]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` under the chat template, ending with the assistant turn opener.

    Rendered to text first and tokenized without extra special tokens, so generation and
    training see exactly the same ids whatever `apply_chat_template` returns by version.
    """
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
