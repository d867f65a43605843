"""The whole judge contract: the protocols, the records they return, the optional
capabilities a campaign looks for, and the errors judges raise.

A judge is anything with `compare` (pairwise) or `score` (pointwise). Both take a
batch, so API judges can run requests concurrently and local judges can batch on the
device. Records carry usage (tokens, cost, latency) so a campaign knows what it paid.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Protocol, Sequence, runtime_checkable

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
    `position_consistent`: for a judge that asked in both orders, whether the two answers
    named the same response (None: asked once, or an answer was unusable).
    """

    winner: Winner | None
    error: str | None = None
    prob_a: float | None = None
    raw: str = ""
    usage: Usage | None = None
    position_consistent: bool | None = None

    def __post_init__(self) -> None:
        if (self.winner is None) == (self.error is None):
            raise ValueError("a Verdict has either a winner or an error, not both or neither")

    @classmethod
    def failed(cls, reason: str, raw: str = "", usage: Usage | None = None) -> "Verdict":
        return cls(winner=None, error=reason, raw=raw, usage=usage)

    def swapped(self) -> "Verdict":
        """The same verdict with A and B exchanged (for a comparison asked the other way round)."""
        winner = {"a": "b", "b": "a"}.get(self.winner, self.winner)
        prob_a = None if self.prob_a is None else 1.0 - self.prob_a
        return Verdict(winner, self.error, prob_a, self.raw, self.usage, self.position_consistent)


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


# --- optional capabilities --------------------------------------------------------------
#
# A judge may also have these attributes; the campaign reads them through the functions below.
#   remote: bool      it waits on a remote API, so a campaign judges one slice of a round while
#                     the next generates (judge.overlap_generation=auto)
#   stats: JudgeStats running counts (requests, cache hits, tokens, cost, position consistency);
#                     a round records what it added (`Stats.since`)
#   protocol          an LLM judge's prompting; `protocol.templates()` names the templates (by
#                     hash) that produced its verdicts


@runtime_checkable
class Stats(Protocol):
    def since(self, earlier: Any) -> Any: ...

    def as_dict(self) -> dict: ...


@runtime_checkable
class OrdersApart(Protocol):
    """A pairwise judge that asks in both orders and can ask them apart, so the round robin
    (`judges.ranking`) asks the second order only of the games that decide its pair.

    compare_as_shown: each item asked once, in the order shown (a verdict oriented as the item).
    combine_orders: the verdict both orders give, from the item's shown-order verdict and its
    reversed-order one (oriented back as the item), as `compare` would combine them (its
    statistics counted)."""

    both_orders: bool

    def compare_as_shown(self, items: Sequence[PairwiseItem]) -> list[Verdict]: ...

    def combine_orders(self, shown: Verdict, reversed_back: Verdict) -> Verdict: ...


def asks_orders_apart(judge: object) -> bool:
    """Whether `judge` asks in both orders and can ask them one at a time (`OrdersApart`)."""
    return isinstance(judge, OrdersApart) and bool(judge.both_orders)


def is_remote(judge: object) -> bool:
    return bool(getattr(judge, "remote", False))


def check_reachable(judge: object) -> None:
    """Raise JudgeUnreachable now, before a campaign loads its models, where a judge behind an API
    (one with a `check_reachable()` method) cannot reach its endpoint; other judges pass."""
    check = getattr(judge, "check_reachable", None)
    if callable(check):
        check()


def judge_stats(judge: object) -> Stats | None:
    stats = getattr(judge, "stats", None)
    return stats if isinstance(stats, Stats) else None


def template_hashes(judge: object) -> dict[str, str] | None:
    protocol = getattr(judge, "protocol", None)
    return protocol.templates() if protocol is not None else None


def check_judge(judge: object, where: str) -> object:
    """`judge` if it implements a judge protocol, else a `NotAJudge` naming what it lacks.
    A judge without a `name` is named after its class: compare() or score() is the contract."""
    methods = [m for m in ("compare", "score") if callable(getattr(judge, m, None))]
    if methods and not hasattr(judge, "name"):
        try:
            judge.name = type(judge).__name__
        except AttributeError:  # __slots__ without a name: say so rather than guess
            pass
    if isinstance(judge, (PairwiseJudge, PointwiseScorer)):
        return judge
    lacks = "`name` attribute (and none can be set on it)" if methods else "compare(items) or score(items) method"
    raise NotAJudge(f"{where} gave a {type(judge).__name__}, which is not a judge: it has no {lacks}. "
                    f"A judge has compare(list[PairwiseItem]) -> list[Verdict] or "
                    f"score(list[PointwiseItem]) -> list[Score] (see judges/base.py)")


class FunctionScorer:
    """A pointwise scorer from a plain function `fn(prompt, response, reference) -> float`.
    An exception, None or a non-finite number is that response's judge error, counted apart."""

    def __init__(self, fn: Callable[[str, str, str | None], float], name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", type(fn).__name__)

    def score(self, items: Sequence[PointwiseItem]) -> list[Score]:
        out = []
        for it in items:
            try:
                value = self.fn(it.prompt, it.response, it.reference)
            except Exception as e:  # noqa: BLE001 - a user's function failing on one response is that response's error
                out.append(Score(None, error=f"{type(e).__name__}: {e}"))
                continue
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            out.append(Score(float(value)) if ok else Score(None, error=f"{self.name} returned {value!r}, not a number"))
        return out


def as_judge(obj: object, where: str = "judge") -> PairwiseJudge | PointwiseScorer:
    """A judge object as it is, or a plain scoring function wrapped as a `FunctionScorer`."""
    if isinstance(obj, type):
        raise NotAJudge(f"{where} is the class {obj.__name__}; pass an instance of it, e.g. {obj.__name__}()")
    if callable(obj) and not any(callable(getattr(obj, m, None)) for m in ("compare", "score")):
        return FunctionScorer(obj)
    return check_judge(obj, where)


# --- errors judges raise (the CLI prints each as one line) ----------------------------------

class JudgeError(Exception):
    """Base of the errors below."""


class UnknownJudgeError(JudgeError, KeyError):
    """judge.name names no judge; the message lists the ones there are."""

    def __str__(self) -> str:  # KeyError quotes its message; this one is meant to be read
        return str(self.args[0])


class NotAJudge(JudgeError, TypeError):
    """A loaded plugin that implements neither judge protocol."""


class JudgeLoadError(JudgeError, ValueError):
    """A judge that cannot be loaded or built: a syntax error, an import that fails inside its
    file, an exception in its constructor (the message names the file and line), or options a
    built-in judge refuses (a ValueError, as the refusal itself was)."""


class JudgeUnreachable(JudgeLoadError):
    """An API judge whose endpoint does not answer when the campaign starts."""


class MissingAPIKey(JudgeError, RuntimeError):
    """An API judge whose key variable is not set."""


class BudgetExceeded(JudgeError, RuntimeError):
    """A paid judge reached its max_calls / max_cost: the campaign stops, nothing paid is lost."""


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
        scores = scores_or_errors(self.scorer, flat)
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


IDENTICAL = "identical responses: a tie, not asked"
_log = logging.getLogger("judges")
_reported: set[tuple[str, str]] = set()  # (judge, error kind) already logged: each is shown once


def scores_or_errors(scorer: PointwiseScorer, items: Sequence[PointwiseItem]) -> list[Score]:
    """scorer.score(items); an exception raised by it is every item's judge error (see `_failure`)."""
    return _or_errors(scorer, scorer.score, items, lambda reason: Score(None, error=reason))


def verdicts_or_errors(judge: PairwiseJudge, items: Sequence[PairwiseItem],
                       compare: Callable | None = None) -> list[Verdict]:
    """judge.compare(items) (or another of its methods, `compare`); an exception raised by it is
    every item's judge error (see `_failure`)."""
    return _or_errors(judge, compare or judge.compare, items, Verdict.failed)


def _or_errors(judge: object, method: Callable, items: Sequence, failed: Callable[[str], Any]) -> list:
    try:
        return method(items)
    except JudgeError:
        raise
    except Exception as e:  # noqa: BLE001 - a judge's own failure is a counted error, not a win or a loss
        return [failed(_failure(judge, e)) for _ in items]


def _failure(judge: object, error: Exception) -> str:
    """The error text a judge's exception leaves on each item, logged the first time its kind is seen.
    JudgeErrors (a budget, a missing key) are not caught: they stop the campaign."""
    name = getattr(judge, "name", type(judge).__name__)
    text = f"{name} raised {type(error).__name__}: {error}"
    if (name, type(error).__name__) not in _reported:
        _reported.add((name, type(error).__name__))
        _log.warning("judge %s; its items count as judge errors, never as wins or losses (later failures of this "
                     "kind are counted, not logged)", text)
    return text


def compare_distinct(judge: PairwiseJudge, items: Sequence[PairwiseItem],
                     compare: Callable | None = None) -> list[Verdict]:
    """judge.compare(items) (or `compare`, another of its methods), with every pair of identical
    responses a tie that costs no call: no judge can prefer a text to itself, and an LLM asked
    anyway answers by position."""
    asked = [k for k, it in enumerate(items) if it.response_a != it.response_b]
    verdicts = [Verdict("tie", raw=IDENTICAL) for _ in items]
    if asked:
        for k, v in zip(asked, verdicts_or_errors(judge, [items[k] for k in asked], compare), strict=True):
            verdicts[k] = v
    return verdicts


def as_pairwise(judge: PairwiseJudge | PointwiseScorer) -> PairwiseJudge:
    if isinstance(judge, PairwiseJudge):
        return judge
    if isinstance(judge, PointwiseScorer):
        return ScorerAsPairwise(judge)
    raise NotAJudge(f"{type(judge).__name__} has neither compare() nor score(); it is not a judge")
