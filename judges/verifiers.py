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
