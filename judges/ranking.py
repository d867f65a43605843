"""Scoring K candidates per prompt with any judge (used by pair selection).

A pointwise scorer scores each candidate directly. A pairwise judge plays a round
robin among the K candidates and each candidate's score is its share of points
(win 1, tie 0.5) over the comparisons that did not fail. A candidate whose every
comparison failed gets an error score, never a number.

A judge that asks in both orders (an LLM judge, against its position bias) pays two requests
per game. Most of them do not decide the pair that best-vs-worst takes from the ranking, so
with `second_order="deciding"` (for a judge that can ask the orders apart, `OrdersApart`)
every game is first asked in one order, positions alternating, and the second order is asked
only of the games of the candidates that would make the pair: those scored (within `band`)
as the best or the worst. Their games, combined from both orders, may change the ranking, so
this repeats until every game of the best and the worst candidates has both orders.

A round robin scored by a noisy judge ranks its candidates even where they are all equally
good: position bias and chance alone spread the scores. `separation_pvalue` tells the two
apart (how likely a spread this large is from a judge that cannot tell the candidates apart),
so pair selection can drop the prompts whose ranking is noise, as it drops a verifier's ties.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from typing import Literal, Sequence

import numpy as np

from judges.base import (
    IDENTICAL,
    PairwiseItem,
    PairwiseJudge,
    PointwiseItem,
    PointwiseScorer,
    Score,
    Verdict,
    asks_orders_apart,
    compare_distinct,
    scores_or_errors,
    verdicts_or_errors,
)


@dataclass(frozen=True)
class CandidateGroup:
    prompt: str
    responses: list[str]
    reference: str | None = None


SecondOrder = Literal["all", "deciding"]


def score_groups(judge, groups: Sequence[CandidateGroup], second_order: SecondOrder = "all",
                 band: float = 0.0) -> tuple[list[list[Score]], list[Verdict]]:
    """Scores per candidate for every group, plus the raw pairwise verdicts (empty for scorers).

    second_order: "all" (the judge's own way: both orders of every game, for a judge that asks
    both) or "deciding" (the second order only of the games of the candidates scored within
    `band` of the best or the worst; see the module docstring). "deciding" asks a judge that
    cannot ask its orders apart (`judges.base.asks_orders_apart`) the judge's own way."""
    if isinstance(judge, PointwiseScorer):
        flat = [PointwiseItem(g.prompt, r, g.reference) for g in groups for r in g.responses]
        scores = scores_or_errors(judge, flat)
        out, i = [], 0
        for g in groups:
            out.append(scores[i : i + len(g.responses)])
            i += len(g.responses)
        return out, []
    if isinstance(judge, PairwiseJudge):
        return _round_robin(judge, groups, second_order, band)
    raise TypeError(f"{type(judge).__name__} has neither score() nor compare(); it is not a judge")


def round_robin_games(n: int) -> list[tuple[int, int]]:
    """The comparisons of a round robin among n candidates, (i, j) with i < j, in the order played."""
    return list(combinations(range(n), 2))


def shown_first(i: int, j: int) -> bool:
    """Whether game (i, j), i < j, shows candidate i first. Alternating by parity puts every
    candidate first in about half its games, so a judge that favours a position (asked in one
    order) spreads no candidate's score: its round robin stays within chance."""
    return (i + j) % 2 == 1


def _round_robin(judge: PairwiseJudge, groups: Sequence[CandidateGroup], second_order: SecondOrder, band: float):
    """Scores from every pair of each group's candidates; the verdicts come back oriented as
    game (i, j) (winner "a" is i), whichever of the two was shown first."""
    index, items = [], []  # (group, i, j) and the item as shown, per game
    for gi, g in enumerate(groups):
        for i, j in round_robin_games(len(g.responses)):
            index.append((gi, i, j))
            first, second = (i, j) if shown_first(i, j) else (j, i)
            items.append(PairwiseItem(g.prompt, g.responses[first], g.responses[second], g.reference))
    if second_order == "deciding" and asks_orders_apart(judge):
        as_shown = _deciding_games_in_both_orders(judge, groups, index, items, band)
    else:
        as_shown = compare_distinct(judge, items)
    verdicts = _as_games(index, as_shown)
    return _shares(groups, index, verdicts), verdicts


def _as_games(index: list[tuple[int, int, int]], as_shown: list[Verdict]) -> list[Verdict]:
    """Verdicts on the items as shown, oriented as their games (i, j): winner "a" is i."""
    return [v if shown_first(i, j) else v.swapped() for (_, i, j), v in zip(index, as_shown)]


def _shares(groups: Sequence[CandidateGroup], index: list[tuple[int, int, int]], verdicts: list[Verdict]) -> list[list[Score]]:
    """Each candidate's share of points (win 1, tie 0.5) over its games that did not fail."""
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
    return [
        [Score(p / n) if n else Score(None, error="every comparison of this candidate failed")
         for p, n in zip(pts, cnt)]
        for pts, cnt in zip(points, played)
    ]


def _deciding_games_in_both_orders(judge, groups, index, items, band: float) -> list[Verdict]:
    """Every game asked once as shown; then, until none is left, the reversed order of each game
    of a candidate scored within `band` of its group's best or worst, combined with the first
    (`OrdersApart.combine_orders`). Verdicts oriented as the items (as shown)."""
    as_shown = compare_distinct(judge, items, judge.compare_as_shown)
    # An identical pair is a tie without a call, and a failed game fails in both orders: neither is asked again.
    settled = [v.error is not None or v.raw == IDENTICAL for v in as_shown]
    while True:
        deciding = [_extremes(scores, band) for scores in _shares(groups, index, _as_games(index, as_shown))]
        ask = [k for k, (gi, i, j) in enumerate(index)
               if not settled[k] and (i in deciding[gi] or j in deciding[gi])]
        if not ask:
            return as_shown
        reversed_items = [PairwiseItem(it.prompt, it.response_b, it.response_a, it.reference)
                          for it in (items[k] for k in ask)]
        for k, v in zip(ask, verdicts_or_errors(judge, reversed_items, judge.compare_as_shown), strict=True):
            as_shown[k] = judge.combine_orders(as_shown[k], v.swapped())
            settled[k] = True


def _extremes(scores: list[Score], band: float) -> set[int]:
    """The candidates scored within `band` of the group's best or worst usable score."""
    usable = [(s.value, c) for c, s in enumerate(scores) if s.value is not None]
    if not usable:
        return set()
    top, bottom = max(v for v, _ in usable), min(v for v, _ in usable)
    return {c for v, c in usable if v >= top - band - 1e-12 or v <= bottom + band + 1e-12}


def round_robin_shares(n: int, games: np.ndarray, outcomes: np.ndarray) -> np.ndarray:
    """Each candidate's share of points over the games it played (NaN: it played none).

    Shape: games [G, 2] (int, the two candidates), outcomes [D, G] (1 / 0.5 / 0 for the
    first candidate of each game; D draws of the whole round robin) -> [D, n].
    """
    won = np.zeros((outcomes.shape[0], n))
    np.add.at(won.T, games[:, 0], outcomes.T)
    np.add.at(won.T, games[:, 1], 1.0 - outcomes.T)
    played = np.bincount(games.ravel(), minlength=n).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return won / played


def smallest_separation_pvalue(n: int) -> float:
    """The least p-value `separation_pvalue` can give n candidates: that of a round robin with
    every game decisive and transitive, the only kind that reaches the largest spread (the n!
    orderings among 2^(n(n-1)/2) equally likely outcomes under the null). Under 6 candidates it
    exceeds 0.02: too few comparisons to tell a ranking from chance."""
    return math.factorial(n) / 2 ** (n * (n - 1) // 2)


def separation_pvalue(n: int, games: Sequence[tuple[int, int]], outcomes: Sequence[float], seed: int,
                      draws: int = 2000) -> float:
    """How likely the round robin's spread of scores is from a judge that cannot tell the n
    candidates apart: a sign-flip test.

    Under that null every decisive game (outcome 1 or 0) is equally likely either way,
    whatever the judge's tie rate or position bias (both orders make a position-biased
    answer a tie or a coin flip); ties stay ties. The statistic is the variance of the
    candidates' shares, which grows with any structure (one right answer among wrong ones,
    or several). Games whose verdict failed are left out before the call.

    Shape: games [G] pairs (i, j), outcomes [G] (1 / 0.5 / 0 for i). Returns p in (0, 1];
    1.0 where no game was decisive. Seeded, so a resumed round gets the same p.
    """
    if not games:
        return 1.0
    g = np.asarray(games, dtype=int)  # [G, 2]
    x = np.asarray(outcomes, dtype=float)  # [G]
    decisive = x != 0.5
    if not decisive.any():
        return 1.0
    observed = np.nanvar(round_robin_shares(n, g, x[None, :]), axis=1)[0]
    rng = np.random.default_rng(seed)
    flips = rng.random((draws, x.size)) < 0.5  # [D, G]
    null = np.where(decisive & flips, 1.0 - x, x)  # [D, G]
    spread = np.nanvar(round_robin_shares(n, g, null), axis=1)  # [D]
    # Float sums of the same shares in another order differ in the last bits: compare with a tolerance.
    return float((1 + np.sum(spread >= observed - 1e-12)) / (1 + draws))
