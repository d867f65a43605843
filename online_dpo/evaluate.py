"""Per-round win rates with confidence intervals, a length-controlled win rate, and task accuracy.

Win rate counts a tie as half a win. Judge errors are counted apart and excluded from
the win rate's denominator: a failure is never a win or a loss. The 95% interval is
Wilson's score interval on the half-counted proportion (ties make it conservative:
a tie is counted as if it were half a coin flip), or a seeded percentile bootstrap
over the per-comparison outcomes (1, 0.5, 0).

The length-controlled win rate follows AlpacaEval 2: a logistic regression of each
comparison's outcome on the (squashed, normalized) length difference of the two
responses; the win rate it predicts at zero length difference is what the policy would
win if both responses were equally long.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Literal, Sequence

import numpy as np

from judges.base import PairwiseItem, PointwiseItem, Score, Verdict, compare_distinct
from judges.verifiers import FinalAnswerVerifier

Z95 = 1.959963984540054
CIMethod = Literal["wilson", "bootstrap"]
RATIONALE_CHARS = 2000  # per-comparison judge text kept in eval.json (LLM rationales can be long)
OUTCOME = {"a": 1.0, "tie": 0.5, "b": 0.0}


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion `successes / n` (successes may be fractional)."""
    if n <= 0:
        return math.nan, math.nan
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0))
    # Clamp: float rounding can push the ends a hair past [0, 1] or past p itself.
    return max(0.0, min(center - half, p)), min(1.0, max(center + half, p))


def bootstrap_interval(outcomes: Sequence[float], confidence: float = 0.95, n_boot: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `outcomes` (shape [n]), seeded."""
    x = np.asarray(outcomes, dtype=float)
    if x.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)  # [n_boot]
    alpha = (1 - confidence) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def win_rate(verdicts: Sequence[Verdict], ci: CIMethod = "wilson", confidence: float = 0.95,
             n_boot: int = 2000, seed: int = 0) -> dict:
    """Counts, the tie-half win rate of A over B and its interval; errors counted apart.

    `n` counts every verdict (errors included); the win rate's denominator leaves errors out.
    """
    wins = sum(v.winner == "a" for v in verdicts)
    losses = sum(v.winner == "b" for v in verdicts)
    ties = sum(v.winner == "tie" for v in verdicts)
    errors = sum(v.error is not None for v in verdicts)
    decided = wins + losses + ties
    total = len(verdicts)
    if decided == 0:
        rate = low = high = math.nan
    else:
        rate = (wins + 0.5 * ties) / decided
        if ci == "wilson":
            low, high = wilson_interval(wins + 0.5 * ties, decided, confidence)
        elif ci == "bootstrap":
            low, high = bootstrap_interval([OUTCOME[v.winner] for v in verdicts if v.error is None],
                                           confidence, n_boot, seed)
        else:
            raise ValueError(f"unknown CI method {ci!r}; use 'wilson' or 'bootstrap'")
    return {
        "n": total, "wins": wins, "losses": losses, "ties": ties, "errors": errors,
        "win_rate": rate, "ci_low": low, "ci_high": high,
        "tie_rate": ties / total if total else math.nan,
        "error_rate": errors / total if total else math.nan,
        "ci_method": ci, "confidence": confidence,
    }


def length_controlled_win_rate(outcomes: Sequence[float], length_a: Sequence[float], length_b: Sequence[float],
                               l2: float = 1.0, iterations: int = 50) -> float:
    """AlpacaEval-style length-controlled win rate of A over B.

    Fits P(A wins) = sigmoid(w0 + w1 * tanh((len_a - len_b) / std(len_a - len_b))) to the
    per-comparison outcomes (shape [n], values in [0, 1]: 1 win, 0.5 tie, 0 loss) by
    Newton's method on the cross-entropy, with an L2 penalty `l2` on the length weight
    only (it keeps w1 finite when length separates the outcomes perfectly). Returns the
    predicted win rate at zero length difference, sigmoid(w0); NaN without outcomes.
    """
    y = np.asarray(outcomes, dtype=float)
    if y.size == 0:
        return math.nan
    diff = np.asarray(length_a, dtype=float) - np.asarray(length_b, dtype=float)
    scale = diff.std()
    x = np.tanh(diff / scale) if scale > 0 else np.zeros_like(diff)
    X = np.stack([np.ones_like(x), x], axis=1)  # [n, 2]
    penalty = np.diag([0.0, l2])
    # The intercept alone cannot reach y=0 or y=1 (all losses / all wins): a tiny pull
    # toward 0.5 keeps Newton finite; it changes nothing measurable otherwise.
    penalty[0, 0] = 1e-6
    w = np.zeros(2)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(X @ w)))
        grad = X.T @ (p - y) + penalty @ w
        hess = X.T @ (X * (p * (1 - p))[:, None]) + penalty
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(1.0 / (1.0 + math.exp(-w[0])))


def length_stats(lengths: Sequence[float]) -> dict:
    """Mean, median, 90th percentile and max of response lengths (NaN when empty)."""
    x = np.asarray(lengths, dtype=float)
    if x.size == 0:
        return {"mean": math.nan, "median": math.nan, "p90": math.nan, "max": math.nan}
    return {"mean": float(x.mean()), "median": float(np.median(x)), "p90": float(np.quantile(x, 0.9)),
            "max": float(x.max())}


def correctness(prompts, responses: Sequence[str]) -> list[float] | None:
    """1.0 / 0.0 per response: does its final number match the prompt's reference (None where prompts have none)."""
    if not prompts or any(p.reference is None for p in prompts):
        return None
    scores = FinalAnswerVerifier().score(
        [PointwiseItem(p.text, r, p.reference) for p, r in zip(prompts, responses)]
    )
    return [s.value if s.value is not None else 0.0 for s in scores]


def accuracy(prompts, responses: Sequence[str]) -> float | None:
    """Share of responses whose final number matches the prompt's reference, where prompts have one."""
    correct = correctness(prompts, responses)
    return None if correct is None else sum(correct) / len(correct)


def pass_rate(scores: Sequence[Score], pass_score: float = 1.0, confidence: float = 0.95) -> dict:
    """The share of responses a pointwise scorer passes (a score >= `pass_score`), with Wilson's
    interval, and their mean score; a judge error is counted apart, never a pass or a fail.

    Shape: scores [n], one per held-out prompt. `n` counts them all, errors included.
    """
    values = [s.value for s in scores if s.error is None and s.value is not None and math.isfinite(s.value)]
    passed = sum(v >= pass_score for v in values)
    low, high = wilson_interval(passed, len(values), confidence)
    return {"n": len(scores), "passed": passed, "errors": len(scores) - len(values),
            "pass_rate": passed / len(values) if values else math.nan, "ci_low": low, "ci_high": high,
            "mean_score": float(np.mean(values)) if values else math.nan, "pass_score": pass_score,
            "confidence": confidence}


def compare(judge, prompts, responses_a: Sequence[str], responses_b: Sequence[str]) -> list[Verdict]:
    items = [PairwiseItem(p.text, a, b, p.reference) for p, a, b in zip(prompts, responses_a, responses_b, strict=True)]
    return compare_distinct(judge, items)


def comparison_items(prompts, responses_a: Sequence[str], responses_b: Sequence[str],
                     verdicts: Sequence[Verdict]) -> list[dict]:
    """One JSON-ready record per comparison: the verdict, the judge's text, both lengths."""
    return [{
        "prompt_id": p.id, "prompt": p.text, "reference": p.reference,
        "winner": v.winner, "error": v.error, "prob_a": v.prob_a,
        "rationale": (v.raw or "")[:RATIONALE_CHARS], "position_consistent": v.position_consistent,
        "chars_a": len(a), "chars_b": len(b),
    } for p, a, b, v in zip(prompts, responses_a, responses_b, verdicts, strict=True)]


def summarize(prompts, responses_a: Sequence[str], responses_b: Sequence[str], verdicts: Sequence[Verdict]) -> dict:
    """win_rate() plus the length-controlled win rate and the judge's usage for one comparison set."""
    out = win_rate(verdicts)
    judged = [(OUTCOME[v.winner], len(a), len(b)) for a, b, v in zip(responses_a, responses_b, verdicts) if v.error is None]
    out["lc_win_rate"] = length_controlled_win_rate(*zip(*judged)) if judged else math.nan
    usages = [v.usage for v in verdicts if v.usage is not None]
    out["judge_calls"] = sum(u.calls for u in usages)
    out["judge_cost"] = sum(u.cost for u in usages)
    consistency = [v.position_consistent for v in verdicts if v.position_consistent is not None]
    out["position_consistency"] = sum(consistency) / len(consistency) if consistency else None
    return out


def evaluate_round(judge, prompts, responses, response_tokens, baseline, previous=None) -> dict:
    """Metrics for one round's eval responses against the round-0 baseline (and the previous round).

    `vs_baseline` / `vs_previous` hold win_rate()'s keys plus lc_win_rate, judge usage and
    position consistency; `comparisons` keeps every verdict (for the report and `inspect`);
    `response_tokens` is the length distribution of this round's responses.
    """
    verdicts = compare(judge, prompts, responses, baseline)
    result = {
        "vs_baseline": summarize(prompts, responses, baseline, verdicts),
        "accuracy": accuracy(prompts, responses),
        "response_tokens": length_stats(response_tokens),
        "comparisons": {"vs_baseline": comparison_items(prompts, responses, baseline, verdicts)},
    }
    if previous is not None:
        prev_verdicts = compare(judge, prompts, responses, previous)
        result["vs_previous"] = summarize(prompts, responses, previous, prev_verdicts)
        result["comparisons"]["vs_previous"] = comparison_items(prompts, responses, previous, prev_verdicts)
    return result
