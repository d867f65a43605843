"""A judge of known quality: any judge's verdicts, corrupted the way LLM judges fail.

For experiments and tests of how a campaign copes with judge noise. The truth comes from
another judge: a verifier against reference answers (`arithmetic`), or a scorer that needs
none (`instructions`: the response that follows more of the prompt's instructions is the
better one, and equal shares are a tie); a pointwise truth compares by its scores. Each
*request* (one order of one comparison) is then answered as an imperfect LLM judge would
answer it:

- where the truth is decisive (one response is better), the answer names the worse one
  with probability `flip_rate` (ε);
- where the truth is a tie (both right, both wrong), the answer names the response shown
  first with probability `position_bias` (p); 0.5 is an unbiased coin.

With `both_orders` each comparison is asked in both orders, and the two answers are
combined as the LLM judges combine them (`judges.llm_judge.BothOrders`): agreeing answers
count, disagreeing ones become a tie (position-inconsistent). The draw of each request is a
pure function of (seed, the request's text), so the same request always gets the same
answer, as from a cached LLM judge at temperature 0, and a resumed run sees the same verdicts.

    judge:
      name: noisy
      options: {truth: arithmetic, flip_rate: 0.15, position_bias: 0.7}   # or truth: instructions

`NoiseModel` is the noise alone, so a test server can answer HTTP requests with it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal, Sequence

from judges.base import PairwiseItem, Verdict, as_pairwise
from judges.llm_judge import JudgeStats

Shown = Literal["first", "second"]


@dataclass(frozen=True)
class NoiseModel:
    """How an imperfect judge answers one request, given the truth about what it was shown."""

    flip_rate: float = 0.15
    position_bias: float = 0.7
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.flip_rate <= 1.0:
            raise ValueError(f"flip_rate is a probability in [0, 1], got {self.flip_rate}")
        if not 0.0 <= self.position_bias <= 1.0:
            raise ValueError(f"position_bias is a probability in [0, 1], got {self.position_bias}")

    def uniform(self, request: str) -> float:
        """A number in [0, 1) drawn from (seed, request): the same request, the same draw."""
        digest = hashlib.sha256(f"{self.seed}\x00{request}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    def answer(self, better: Shown | None, request: str) -> Shown:
        """The response the judge names. better: the one that truly is (None: a tie)."""
        u = self.uniform(request)
        if better is None:
            return "first" if u < self.position_bias else "second"
        if u < self.flip_rate:
            return "second" if better == "first" else "first"
        return better


class NoisyJudge:
    """Pairwise judge: `truth`'s verdicts through a `NoiseModel`, in both orders by default.

    truth: a judge name (`judges.registry`) built with `truth_options`, or a judge object.
    Its errors stay errors. `stats` counts requests and position consistency, as an LLM
    judge's do, so the report shows what a real judge of this quality would show.
    """

    def __init__(self, truth: Any = "arithmetic", flip_rate: float = 0.15, position_bias: float = 0.7,
                 both_orders: bool = True, seed: int = 0, truth_options: dict | None = None):
        if isinstance(truth, str):
            from judges.registry import load_judge  # the registry names this class: import late

            truth = load_judge(truth, **(truth_options or {}))
        self.truth = as_pairwise(truth)
        self.noise = NoiseModel(flip_rate, position_bias, seed)
        self.both_orders = both_orders
        self.name = f"noisy({self.truth.name}, flip_rate={flip_rate:g}, position_bias={position_bias:g})"
        self.stats = JudgeStats()

    def compare(self, items: Sequence[PairwiseItem]) -> list[Verdict]:
        shown = self.compare_as_shown(items)
        if not self.both_orders:
            return shown
        swapped = [PairwiseItem(it.prompt, it.response_b, it.response_a, it.reference) for it in items]
        reversed_back = [v.swapped() for v in self.compare_as_shown(swapped)]
        return [self.combine_orders(a, b) for a, b in zip(shown, reversed_back, strict=True)]

    def compare_as_shown(self, items: Sequence[PairwiseItem]) -> list[Verdict]:
        """Each item asked once, in the order shown: one request each (the truth's errors cost none)."""
        return [self._ask(item, truth) for item, truth in zip(items, self.truth.compare(items), strict=True)]

    def combine_orders(self, shown: Verdict, reversed_back: Verdict) -> Verdict:
        """As an LLM judge combines its two orders: agreeing answers count, disagreeing ones are a tie."""
        if shown.error is not None or reversed_back.error is not None:
            return shown if shown.error is not None else reversed_back
        raw = f"{shown.raw} | BA: {reversed_back.raw.rsplit(' ', 1)[-1]}"
        if shown.winner == reversed_back.winner:
            self.stats.consistent += 1
            return Verdict(shown.winner, raw=raw, position_consistent=True)
        self.stats.inconsistent += 1
        return Verdict("tie", raw=raw, position_consistent=False)

    def _ask(self, item: PairwiseItem, truth: Verdict) -> Verdict:
        """The judge's answer to one request: 'a' when it names the response shown first, else 'b'."""
        if truth.error is not None:
            return truth
        self.stats.requests += 1
        better = {"a": "first", "b": "second", "tie": None}[truth.winner]
        said = self.noise.answer(better, f"{item.prompt}\x00{item.response_a}\x00{item.response_b}")
        winner = "a" if said == "first" else "b"
        return Verdict(winner, raw=f"truth: {truth.winner}; AB: {winner.upper()}")
