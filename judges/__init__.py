"""Pluggable judges for online-dpo, importable on their own (`import judges`).

Two protocols: a pairwise judge (which of two responses is better) and a pointwise
scorer (a float per response). A judge failure is a `Verdict` / `Score` with `error`
set: it is counted apart, never as a win or a loss.
"""

from judges.base import (
    BudgetExceeded,
    FunctionScorer,
    JudgeError,
    MissingAPIKey,
    NotAJudge,
    PairwiseItem,
    PairwiseJudge,
    PointwiseItem,
    PointwiseScorer,
    Score,
    ScorerAsPairwise,
    UnknownJudgeError,
    Verdict,
    as_judge,
    as_pairwise,
)
from judges.registry import available_judges, load_judge

__all__ = [
    "BudgetExceeded",
    "FunctionScorer",
    "JudgeError",
    "MissingAPIKey",
    "NotAJudge",
    "PairwiseItem",
    "PairwiseJudge",
    "PointwiseItem",
    "PointwiseScorer",
    "Score",
    "ScorerAsPairwise",
    "UnknownJudgeError",
    "Verdict",
    "as_judge",
    "as_pairwise",
    "available_judges",
    "load_judge",
]
