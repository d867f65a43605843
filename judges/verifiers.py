"""Verifiers: pointwise scorers that check a response against a reference answer."""

from __future__ import annotations

import re
from typing import Sequence

from judges.base import PointwiseItem, Score

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_GSM8K_ANSWER = re.compile(r"####\s*(-?[\d,]+(?:\.\d+)?)")


def _to_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def final_number(text: str) -> float | None:
    """The response's final answer as a number: a GSM8K-style `#### N` if present,
    else the last number in the text; None if there is no number at all."""
    marked = _GSM8K_ANSWER.findall(text)
    if marked:
        return _to_number(marked[-1])
    found = _NUMBER.findall(text)
    return _to_number(found[-1].rstrip(",")) if found else None


class FinalAnswerVerifier:
    """Scores 1.0 when the response's final number equals the reference, else 0.0.

    A response without any number scores 0.0 (it is wrong, not a judge failure);
    a missing or non-numeric *reference* is a judge error, because nothing can be verified.
    """

    name = "final_answer"

    def __init__(self, tolerance: float = 1e-6):
        self.tolerance = tolerance

    def score(self, items: Sequence[PointwiseItem]) -> list[Score]:
        out = []
        for it in items:
            expected = _to_number(it.reference) if it.reference is not None else None
            if expected is None:
                out.append(Score(None, error=f"no numeric reference answer (got {it.reference!r})"))
                continue
            got = final_number(it.response)
            correct = got is not None and abs(got - expected) <= self.tolerance
            out.append(Score(1.0 if correct else 0.0, raw=f"answer={got} expected={expected:g}"))
        return out


class ArithmeticVerifier(FinalAnswerVerifier):
    """The verifier for the built-in `arithmetic` task (integer answers)."""

    name = "arithmetic"


class RegexVerifier:
    """1.0 when the response matches `pattern` (re.search), else 0.0. With `{reference}` in
    the pattern, the reference answer (escaped) is substituted first."""

    name = "regex"

    def __init__(self, pattern: str, ignore_case: bool = False):
        self.pattern = pattern
        self.flags = re.IGNORECASE if ignore_case else 0
        re.compile(pattern.replace("{reference}", "x"), self.flags)  # fail at construction on a bad pattern

    def score(self, items: Sequence[PointwiseItem]) -> list[Score]:
        out = []
        for it in items:
            if "{reference}" in self.pattern and it.reference is None:
                out.append(Score(None, error="pattern needs {reference} but the prompt has none"))
                continue
            pattern = self.pattern.replace("{reference}", re.escape(it.reference or ""))
            out.append(Score(1.0 if re.search(pattern, it.response, self.flags) else 0.0))
        return out


class ContainsVerifier:
    """1.0 when the response contains `text` (or, without `text`, the reference answer)."""

    name = "contains"

    def __init__(self, text: str | None = None, ignore_case: bool = True):
        self.text = text
        self.ignore_case = ignore_case

    def score(self, items: Sequence[PointwiseItem]) -> list[Score]:
        out = []
        for it in items:
            needle = self.text if self.text is not None else it.reference
            if needle is None:
                out.append(Score(None, error="no text to look for: set `text` or give prompts a reference"))
                continue
            hay = it.response
            if self.ignore_case:
                needle, hay = needle.lower(), hay.lower()
            out.append(Score(1.0 if needle in hay else 0.0))
        return out


class LengthVerifier:
    """1.0 inside [min_chars, max_chars], falling linearly to 0.0 over `slack` characters outside."""

    name = "length"

    def __init__(self, min_chars: int = 0, max_chars: int = 10**9, slack: int = 1):
        if min_chars > max_chars or slack < 1:
            raise ValueError("length verifier needs min_chars <= max_chars and slack >= 1")
        self.min_chars, self.max_chars, self.slack = min_chars, max_chars, slack

    def score(self, items: Sequence[PointwiseItem]) -> list[Score]:
        out = []
        for it in items:
            n = len(it.response)
            gap = self.min_chars - n if n < self.min_chars else n - self.max_chars if n > self.max_chars else 0
            out.append(Score(max(0.0, 1.0 - gap / self.slack)))
        return out


def _build_parts(parts: list[dict]):
    from judges.registry import load_judge  # late: the registry imports this module

    built = []
    for spec in parts:
        spec = dict(spec)
        name = spec.pop("name", None)
        weight = float(spec.pop("weight", 1.0))
        if name is None:
            raise ValueError(f"each part needs a `name`, got {spec}")
        built.append((load_judge(name, **spec), weight))
    if not built:
        raise ValueError("a composite needs at least one part")
    return built


def _combine_parts(parts, items, combine) -> list[Score]:
    """Score `items` with every part; `combine(values)` merges one item's part values.
    If any part fails on an item, the item is an error (a partial combination would mislead)."""
    per_part = [scorer.score(items) for scorer, _ in parts]
    out = []
    for i in range(len(items)):
        scores = [p[i] for p in per_part]
        errors = [s.error for s in scores if s.error]
        out.append(Score(None, error="; ".join(errors)) if errors else Score(combine([s.value for s in scores])))
    return out


class WeightedMixture:
    """Weighted mean of several scorers: parts=[{name: arithmetic, weight: 1}, {name: length, ...}]."""

    name = "mixture"

    def __init__(self, parts: list[dict]):
        self.parts = _build_parts(parts)
        self.total = sum(w for _, w in self.parts)

    def score(self, items: Sequence[PointwiseItem]) -> list[Score]:
        weights = [w for _, w in self.parts]
        return _combine_parts(self.parts, items, lambda vals: sum(v * w for v, w in zip(vals, weights)) / self.total)


class AllMustPass:
    """A gate: 1.0 only when every part scores at least `threshold`, else 0.0."""

    name = "all_must_pass"

    def __init__(self, parts: list[dict], threshold: float = 1.0):
        self.parts = _build_parts(parts)
        self.threshold = threshold

    def score(self, items: Sequence[PointwiseItem]) -> list[Score]:
        return _combine_parts(self.parts, items, lambda vals: 1.0 if all(v >= self.threshold for v in vals) else 0.0)
