"""Scoring K candidates per prompt with any judge (used by pair selection).

A pointwise scorer scores each candidate directly. A pairwise judge plays a round
robin among the K candidates and each candidate's score is its share of points
(win 1, tie 0.5) over the comparisons that did not fail. A candidate whose every
comparison failed gets an error score, never a number.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Sequence

from judges.base import PairwiseItem, PairwiseJudge, PointwiseItem, PointwiseScorer, Score, Verdict


@dataclass(frozen=True)
class CandidateGroup:
    prompt: str
    responses: list[str]
    reference: str | None = None


def score_groups(judge, groups: Sequence[CandidateGroup]) -> tuple[list[list[Score]], list[Verdict]]:
    """Scores per candidate for every group, plus the raw pairwise verdicts (empty for scorers)."""
    if isinstance(judge, PointwiseScorer):
        flat = [PointwiseItem(g.prompt, r, g.reference) for g in groups for r in g.responses]
        scores = judge.score(flat)
        out, i = [], 0
        for g in groups:
            out.append(scores[i : i + len(g.responses)])
            i += len(g.responses)
        return out, []
    if isinstance(judge, PairwiseJudge):
        return _round_robin(judge, groups)
    raise TypeError(f"{type(judge).__name__} has neither score() nor compare(); it is not a judge")


def _round_robin(judge: PairwiseJudge, groups: Sequence[CandidateGroup]):
    index, items = [], []
    for gi, g in enumerate(groups):
        for i, j in combinations(range(len(g.responses)), 2):
            index.append((gi, i, j))
            items.append(PairwiseItem(g.prompt, g.responses[i], g.responses[j], g.reference))
    verdicts = judge.compare(items)
    points = [[0.0] * len(g.responses) for g in groups]
    played = [[0] * len(g.responses) for g in groups]
    for (gi, i, j), v in zip(index, verdicts):
        if v.error is not None:
            continue
        played[gi][i] += 1
        played[gi][j] += 1
        gain_i = {"a": 1.0, "b": 0.0, "tie": 0.5}[v.winner]
        points[gi][i] += gain_i
        points[gi][j] += 1.0 - gain_i
    scores = [
        [Score(p / n) if n else Score(None, error="every comparison of this candidate failed")
         for p, n in zip(pts, cnt)]
        for pts, cnt in zip(points, played)
    ]
    return scores, verdicts
