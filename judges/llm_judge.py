"""What every LLM-as-judge shares, whatever serves the model (an API, vLLM in-process):
rendering templates, judging both orders, parsing the verdict, combining the two orders,
and the statistics (position consistency, errors by kind, tokens, cost).

A transport is a function `ask(prompts: list[str], template_sha: str) -> list[Reply]`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

from judges.base import PairwiseItem, Usage, Verdict
from judges.templates import load_template

_VERDICT = re.compile(r"^\W*(A|B|TIE)\b", re.IGNORECASE)
_RATING = re.compile(r"^\W*(10|[1-9])\b")


def parse_choice(text: str) -> str | None:
    """'a', 'b' or 'tie' from the judge's reply, or None when the reply says neither."""
    m = _VERDICT.match(text or "")
    if not m:
        return None
    word = m.group(1).upper()
    return "tie" if word == "TIE" else word.lower()


def parse_rating(text: str) -> int | None:
    """The leading 1-10 rating of a pointwise reply, or None."""
    m = _RATING.match(text or "")
    return int(m.group(1)) if m else None


def prob_first_from_top(top: list[tuple[str, float]]) -> float | None:
    """P(A) / (P(A) + P(B)) from (token, logprob) pairs of the verdict token's top log-probs."""
    mass = {"a": 0.0, "b": 0.0}
    for token, logprob in top:
        tok = (token or "").strip().lower()
        if tok in mass:
            mass[tok] += math.exp(logprob)
    total = mass["a"] + mass["b"]
    return mass["a"] / total if total > 0 else None


@dataclass
class Reply:
    text: str | None = None
    prob_first: float | None = None  # P("A") / (P("A") + P("B")) for the first verdict token
    usage: Usage | None = None
    error: str | None = None  # "kind: detail"


Ask = Callable[[list[str], str], list[Reply]]


@dataclass
class JudgeStats:
    requests: int = 0  # sent to the API
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    consistent: int = 0  # both orders agreed
    inconsistent: int = 0  # both orders answered but disagreed
    errors: Counter = field(default_factory=Counter)  # kind -> count

    @property
    def consistency_rate(self) -> float:
        n = self.consistent + self.inconsistent
        return self.consistent / n if n else math.nan

    def since(self, earlier: "JudgeStats") -> "JudgeStats":
        """What happened after the snapshot `earlier` (e.g. one round's share)."""
        return JudgeStats(
            self.requests - earlier.requests, self.cache_hits - earlier.cache_hits,
            self.prompt_tokens - earlier.prompt_tokens, self.completion_tokens - earlier.completion_tokens,
            self.cost - earlier.cost, self.consistent - earlier.consistent, self.inconsistent - earlier.inconsistent,
            self.errors - earlier.errors,
        )

    def as_dict(self) -> dict:
        return {"requests": self.requests, "cache_hits": self.cache_hits, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "cost": self.cost,
                "position_consistency": self.consistency_rate, "consistent": self.consistent,
                "inconsistent": self.inconsistent, "errors": dict(self.errors)}



class BothOrders:
    """Pairwise judging through templates, in both orders (A/B then B/A) unless told otherwise.

    Agreeing verdicts count; disagreeing ones become ties (`on_disagreement="tie"`) or
    errors marked position_inconsistent (`"drop"`); either way `stats` records them.
    """

    def __init__(self, stats: JudgeStats, template: str | None = None, both_orders: bool = True,
                 on_disagreement: Literal["tie", "drop"] = "tie"):
        if on_disagreement not in ("tie", "drop"):
            raise ValueError("on_disagreement must be 'tie' or 'drop'")
        fields = ("prompt", "response_a", "response_b")
        self.custom = load_template(template, fields) if template else None
        self.plain = load_template("pairwise", fields)
        self.with_reference = load_template("pairwise_reference", (*fields, "reference"))
        self.stats = stats
        self.both_orders = both_orders
        self.on_disagreement = on_disagreement

    def templates(self) -> dict[str, str]:
        chosen = [self.custom] if self.custom else [self.plain, self.with_reference]
        return {t.name: t.sha for t in chosen}

    def _render(self, it: PairwiseItem, first: str, second: str):
        tpl = self.custom or (self.with_reference if it.reference is not None else self.plain)
        fields = {"prompt": it.prompt, "response_a": first, "response_b": second}
        if it.reference is not None and "{reference}" in tpl.text:
            fields["reference"] = it.reference
        return tpl.render(**fields), tpl.sha

    def compare(self, items: Sequence[PairwiseItem], ask: Ask, both_orders: bool | None = None) -> list[Verdict]:
        """A verdict per item, oriented as the item; `both_orders` (default: the judge's own) False
        asks each item once, in the order shown."""
        both = self.both_orders if both_orders is None else both_orders
        jobs = []  # (rendered prompt, template sha) in order: item 0 AB, item 0 BA, item 1 AB, ...
        for it in items:
            jobs.append(self._render(it, it.response_a, it.response_b))
            if both:
                jobs.append(self._render(it, it.response_b, it.response_a))
        # One `ask` per template (plain and reference-guided items may mix), answers put back in order.
        by_sha: dict[str, list[int]] = {}
        for i, (_, sha) in enumerate(jobs):
            by_sha.setdefault(sha, []).append(i)
        replies: list[Reply] = [Reply()] * len(jobs)
        for sha, idx in by_sha.items():
            for i, reply in zip(idx, ask([jobs[i][0] for i in idx], sha)):
                replies[i] = reply
        if not both:
            return [self._single(reply, swapped=False) for reply in replies]
        return [self.combine(self._single(replies[i], swapped=False), self._single(replies[i + 1], swapped=True))
                for i in range(0, len(replies), 2)]

    def _single(self, reply: Reply, swapped: bool) -> Verdict:
        if reply.error:
            return Verdict.failed(reply.error, usage=reply.usage)
        choice = parse_choice(reply.text)
        if choice is None:
            self.stats.errors["unparseable"] += 1
            return Verdict.failed(f"unparseable: judge replied {reply.text[:80]!r}", raw=reply.text, usage=reply.usage)
        prob = reply.prob_first
        if swapped:
            choice = {"a": "b", "b": "a", "tie": "tie"}[choice]
            prob = None if prob is None else 1.0 - prob
        return Verdict(choice, prob_a=prob, raw=reply.text, usage=reply.usage)

    def combine(self, first: Verdict, second: Verdict) -> Verdict:
        """One verdict from the item's two orders, both oriented as the item (A/B, then B/A
        answered and swapped back); counts position consistency in `stats`."""
        usage = _sum_usage(first.usage, second.usage)
        raw = f"AB: {first.raw!r} | BA: {second.raw!r}"
        if first.error or second.error:
            reasons = "; ".join(v.error for v in (first, second) if v.error)
            return Verdict.failed(reasons, raw=raw, usage=usage)
        probs = [p for p in (first.prob_a, second.prob_a) if p is not None]
        prob = sum(probs) / len(probs) if probs else None
        if first.winner == second.winner:
            self.stats.consistent += 1
            return Verdict(first.winner, prob_a=prob, raw=raw, usage=usage, position_consistent=True)
        self.stats.inconsistent += 1
        if self.on_disagreement == "drop":
            self.stats.errors["position_inconsistent"] += 1
            return Verdict(None, "position_inconsistent: the verdict flipped with the order", raw=raw, usage=usage,
                           position_consistent=False)
        return Verdict("tie", prob_a=prob, raw=raw, usage=usage, position_consistent=False)


def _sum_usage(*usages: Usage | None) -> Usage:
    out = Usage()
    for u in usages:
        if u is not None:
            out.prompt_tokens += u.prompt_tokens
            out.completion_tokens += u.completion_tokens
            out.cost += u.cost
            out.latency_s = max(out.latency_s, u.latency_s)
            out.calls += u.calls
    return out
