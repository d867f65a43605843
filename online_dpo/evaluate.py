"""Per-round win rates with confidence intervals, and task accuracy.

Win rate counts a tie as half a win. Judge errors are counted apart and excluded from
the win rate's denominator: a failure is never a win or a loss. The 95% interval is
the normal approximation on the mean per-comparison outcome (1, 0.5 or 0).
"""

from __future__ import annotations

import math
from typing import Sequence

from judges.base import PairwiseItem, PointwiseItem, Verdict
from judges.verifiers import FinalAnswerVerifier

Z95 = 1.959963984540054


def win_rate(verdicts: Sequence[Verdict]) -> dict:
    wins = sum(v.winner == "a" for v in verdicts)
    losses = sum(v.winner == "b" for v in verdicts)
    ties = sum(v.winner == "tie" for v in verdicts)
    errors = sum(v.error is not None for v in verdicts)
    n = wins + losses + ties
    total = len(verdicts)
    if n == 0:
        rate = low = high = float("nan")
    else:
        rate = (wins + 0.5 * ties) / n
        # Variance of per-comparison outcomes in {1, .5, 0}, unbiased.
        sq = wins * 1.0 + ties * 0.25
        var = (sq - n * rate**2) / (n - 1) if n > 1 else 0.0
        half = Z95 * math.sqrt(max(var, 0.0) / n)
        low, high = max(0.0, rate - half), min(1.0, rate + half)
    return {
        "n": total, "wins": wins, "losses": losses, "ties": ties, "errors": errors,
        "win_rate": rate, "ci_low": low, "ci_high": high,
        "tie_rate": ties / total if total else float("nan"),
        "error_rate": errors / total if total else float("nan"),
    }


def accuracy(prompts, responses: Sequence[str]) -> float | None:
    """Share of responses whose final number matches the prompt's reference, where prompts have one."""
    if not prompts or any(p.reference is None for p in prompts):
        return None
    scores = FinalAnswerVerifier().score(
        [PointwiseItem(p.text, r, p.reference) for p, r in zip(prompts, responses)]
    )
    return sum(s.value for s in scores if s.value is not None) / len(scores)


def compare(judge, prompts, responses_a: Sequence[str], responses_b: Sequence[str]) -> list[Verdict]:
    items = [PairwiseItem(p.text, a, b, p.reference) for p, a, b in zip(prompts, responses_a, responses_b, strict=True)]
    return judge.compare(items)


def evaluate_round(judge, prompts, responses, response_tokens, baseline, previous=None) -> dict:
    """Metrics for one round's eval responses against the round-0 baseline (and the previous round)."""
    result = {
        "vs_baseline": win_rate(compare(judge, prompts, responses, baseline)),
        "accuracy": accuracy(prompts, responses),
        "mean_response_tokens": sum(response_tokens) / max(len(response_tokens), 1),
    }
    if previous is not None:
        result["vs_previous"] = win_rate(compare(judge, prompts, responses, previous))
    return result
