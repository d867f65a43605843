"""Judge protocols and the records they return.

A judge is anything with `compare` (pairwise) or `score` (pointwise). Both take a
batch, so API judges can run requests concurrently and local judges can batch on the
device. Records carry usage (tokens, cost, latency) so a campaign knows what it paid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, Sequence, runtime_checkable

Winner = Literal["a", "b", "tie"]


@dataclass(frozen=True)
class PairwiseItem:
    prompt: str
    response_a: str
    response_b: str
    reference: str | None = None


@dataclass(frozen=True)
class PointwiseItem:
    prompt: str
    response: str
    reference: str | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    latency_s: float = 0.0
    calls: int = 0


@dataclass
class Verdict:
    """Outcome of one pairwise comparison.

    `winner` is None exactly when `error` is set: an error is neither a win nor a loss.
    `prob_a` is the judge's probability that A is better, where it gives one.
    """

    winner: Winner | None
    error: str | None = None
    prob_a: float | None = None
    raw: str = ""
    usage: Usage | None = None

    def __post_init__(self) -> None:
        if (self.winner is None) == (self.error is None):
            raise ValueError("a Verdict has either a winner or an error, not both or neither")

    @classmethod
    def failed(cls, reason: str, raw: str = "", usage: Usage | None = None) -> "Verdict":
        return cls(winner=None, error=reason, raw=raw, usage=usage)


@dataclass
class Score:
    """Outcome of scoring one response. `value` is None exactly when `error` is set."""

    value: float | None
    error: str | None = None
    raw: str = ""
    usage: Usage | None = None

    def __post_init__(self) -> None:
        if (self.value is None) == (self.error is None):
            raise ValueError("a Score has either a value or an error, not both or neither")


@runtime_checkable
class PairwiseJudge(Protocol):
    name: str

    def compare(self, items: Sequence[PairwiseItem]) -> list[Verdict]: ...


@runtime_checkable
class PointwiseScorer(Protocol):
    name: str

    def score(self, items: Sequence[PointwiseItem]) -> list[Score]: ...


class ScorerAsPairwise:
    """Pairwise judge from a pointwise scorer: the higher score wins.

    Scores within `tie_tolerance` of each other are a tie; if either score failed the
    verdict is an error carrying both reasons.
    """

    def __init__(self, scorer: PointwiseScorer, tie_tolerance: float = 0.0):
        self.scorer = scorer
        self.tie_tolerance = tie_tolerance
        self.name = getattr(scorer, "name", type(scorer).__name__)

    def compare(self, items: Sequence[PairwiseItem]) -> list[Verdict]:
        flat = []
        for it in items:
            flat.append(PointwiseItem(it.prompt, it.response_a, it.reference))
            flat.append(PointwiseItem(it.prompt, it.response_b, it.reference))
        scores = self.scorer.score(flat)
        verdicts = []
        for sa, sb in zip(scores[0::2], scores[1::2]):
            raw = f"score_a={sa.value} score_b={sb.value}"
            if sa.error or sb.error:
                reasons = "; ".join(f"{side}: {s.error}" for side, s in (("a", sa), ("b", sb)) if s.error)
                verdicts.append(Verdict.failed(reasons, raw=raw))
            elif abs(sa.value - sb.value) <= self.tie_tolerance:
                verdicts.append(Verdict("tie", raw=raw))
            else:
                verdicts.append(Verdict("a" if sa.value > sb.value else "b", raw=raw))
        return verdicts


def as_pairwise(judge: PairwiseJudge | PointwiseScorer) -> PairwiseJudge:
    if isinstance(judge, PairwiseJudge):
        return judge
    if isinstance(judge, PointwiseScorer):
        return ScorerAsPairwise(judge)
    raise TypeError(f"{type(judge).__name__} has neither compare() nor score(); it is not a judge")
