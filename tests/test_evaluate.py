import json
import math

import numpy as np
import pytest

from judges import Verdict
from judges.base import IDENTICAL, Usage
from online_dpo.data import Prompt
from online_dpo.evaluate import (
    bootstrap_interval,
    evaluate_round,
    length_controlled_win_rate,
    length_stats,
    wilson_interval,
    win_rate,
)


def verdicts(wins=0, losses=0, ties=0, errors=0):
    return [Verdict("a")] * wins + [Verdict("b")] * losses + [Verdict("tie")] * ties + [Verdict.failed("x")] * errors


def test_win_rate_counts_ties_half_and_errors_apart():
    r = win_rate(verdicts(wins=6, losses=2, ties=2, errors=5))
    assert (r["wins"], r["losses"], r["ties"], r["errors"], r["n"]) == (6, 2, 2, 5, 15)
    assert r["win_rate"] == (6 + 1) / 10  # errors are not in the denominator
    assert r["error_rate"] == 5 / 15 and r["tie_rate"] == 2 / 15
    assert r["ci_low"] < 0.7 < r["ci_high"]


def test_wilson_matches_the_textbook_formula():
    # 7 of 10 at 95%: the standard Wilson interval is [0.3968, 0.8922] (to 4 places).
    low, high = wilson_interval(7, 10)
    assert (round(low, 4), round(high, 4)) == (0.3968, 0.8922)


def test_fifty_of_a_hundred_contains_one_half():
    r = win_rate(verdicts(wins=50, losses=50))
    assert r["win_rate"] == 0.5 and r["ci_low"] < 0.5 < r["ci_high"]
    assert 0.39 < r["ci_low"] < 0.41 and 0.59 < r["ci_high"] < 0.61  # about +-1.96 * sqrt(.25/100)


def test_all_ties_is_one_half_with_a_symmetric_interval():
    r = win_rate(verdicts(ties=40))
    assert r["win_rate"] == 0.5 and r["tie_rate"] == 1.0
    assert r["ci_low"] < 0.5 < r["ci_high"]
    assert abs((0.5 - r["ci_low"]) - (r["ci_high"] - 0.5)) < 1e-12
    assert r["ci_high"] - r["ci_low"] < 0.35  # narrows with n, not the whole [0, 1]


@pytest.mark.parametrize("n", [1, 10, 200])
def test_none_and_all_wins_stay_inside_zero_one(n):
    lost = win_rate(verdicts(losses=n))
    won = win_rate(verdicts(wins=n))
    assert lost["win_rate"] == 0.0 and lost["ci_low"] == 0.0 and 0.0 < lost["ci_high"] < 1.0
    assert won["win_rate"] == 1.0 and won["ci_high"] == 1.0 and 0.0 < won["ci_low"] < 1.0
    # the interval shrinks as evidence grows: n=200 -> upper end of 0/200 under 2%
    if n == 200:
        assert lost["ci_high"] < 0.02


def test_errors_never_move_the_win_rate():
    clean = win_rate(verdicts(wins=30, losses=10, ties=4))
    noisy = win_rate(verdicts(wins=30, losses=10, ties=4, errors=100))
    for key in ("win_rate", "ci_low", "ci_high"):
        assert clean[key] == noisy[key]
    assert noisy["error_rate"] == 100 / 144 and clean["error_rate"] == 0.0


def test_all_errors_gives_no_win_rate():
    r = win_rate(verdicts(errors=3))
    assert math.isnan(r["win_rate"]) and math.isnan(r["ci_low"]) and r["error_rate"] == 1.0


def test_bootstrap_is_seeded_and_close_to_wilson():
    v = verdicts(wins=55, losses=35, ties=10)
    a, b = win_rate(v, ci="bootstrap", seed=3), win_rate(v, ci="bootstrap", seed=3)
    w = win_rate(v)
    assert (a["ci_low"], a["ci_high"]) == (b["ci_low"], b["ci_high"])
    assert a["ci_low"] < a["win_rate"] < a["ci_high"]
    assert abs(a["ci_low"] - w["ci_low"]) < 0.03 and abs(a["ci_high"] - w["ci_high"]) < 0.03
    assert bootstrap_interval([0.5] * 20) == (0.5, 0.5)  # no spread in the data, none in the means


def test_unknown_ci_method_is_named():
    with pytest.raises(ValueError, match="bootstrap"):
        win_rate(verdicts(wins=1), ci="normal")


def test_lc_win_rate_matches_raw_when_length_is_balanced():
    # Every outcome class sees the same length differences: length explains nothing.
    outcomes, la, lb = [], [], []
    for outcome, count in ((1.0, 30), (0.0, 10), (0.5, 10)):
        for i in range(count):
            d = (-40, -10, 10, 40)[i % 4] if count % 4 == 0 else (-20, 20)[i % 2]
            outcomes.append(outcome), la.append(100 + d), lb.append(100)
    raw = float(np.mean(outcomes))
    assert abs(length_controlled_win_rate(outcomes, la, lb) - raw) < 1e-6


def test_lc_win_rate_moves_toward_half_when_length_explains_the_wins():
    # A is longer 80% of the time and the judge prefers the longer response with a
    # probability set by the length difference alone: at equal length A is no better.
    rng = np.random.default_rng(0)
    n = 1000
    la = np.where(rng.random(n) < 0.8, rng.integers(150, 300, n), rng.integers(20, 100, n))
    lb = np.full(n, 120)
    d = la - lb
    p_win = 1 / (1 + np.exp(-3 * np.tanh(d / d.std())))
    outcomes = (rng.random(n) < p_win).astype(float)
    raw = outcomes.mean()
    lc = length_controlled_win_rate(outcomes, la, lb)
    assert raw > 0.65
    assert abs(lc - 0.5) < 0.05 < raw - 0.5


def test_lc_win_rate_discounts_wins_that_length_separates_perfectly():
    # Every longer response wins (perfect separation): the L2 term keeps the fit finite,
    # and the win rate at equal length falls well below the raw 0.8.
    rng = np.random.default_rng(0)
    la = np.concatenate([rng.integers(150, 250, 80), rng.integers(30, 90, 20)])
    lb = np.full(100, 120)
    outcomes = (la > lb).astype(float)
    lc = length_controlled_win_rate(outcomes, la, lb)
    assert outcomes.mean() == 0.8 and 0.5 < lc < 0.7


def test_lc_win_rate_keeps_a_real_advantage_under_length_noise():
    # A wins 75% whatever the lengths, which are random: LC stays near 0.75.
    rng = np.random.default_rng(1)
    outcomes = (rng.random(400) < 0.75).astype(float)
    la, lb = rng.integers(50, 150, 400), rng.integers(50, 150, 400)
    assert abs(length_controlled_win_rate(outcomes, la, lb) - outcomes.mean()) < 0.03


def test_lc_win_rate_edge_cases():
    assert math.isnan(length_controlled_win_rate([], [], []))
    assert abs(length_controlled_win_rate([1.0] * 5, [10] * 5, [10] * 5) - 1.0) < 1e-3  # finite, near 1
    assert abs(length_controlled_win_rate([0.5] * 6, [1, 2, 3, 4, 5, 6], [3] * 6) - 0.5) < 1e-9


def test_length_stats():
    s = length_stats(list(range(1, 11)))
    assert s["mean"] == 5.5 and s["median"] == 5.5 and s["max"] == 10 and abs(s["p90"] - 9.1) < 1e-9
    assert math.isnan(length_stats([])["mean"])


def test_both_orders_verdicts_say_whether_the_two_answers_agreed():
    from judges.base import PairwiseItem
    from judges.llm_judge import BothOrders, JudgeStats, Reply

    def verdicts(*replies: str, on_disagreement="tie"):
        """The verdicts of one item per (answer to A/B, answer to B/A)."""
        protocol = BothOrders(JudgeStats(), on_disagreement=on_disagreement)
        answers = [Reply(text) for pair in replies for text in pair]
        items = [PairwiseItem("q", f"first {k}", f"second {k}") for k in range(len(replies))]
        return protocol.compare(items, lambda prompts, sha: answers[: len(prompts)])

    agreed, flipped, tied, unreadable = verdicts(("A", "B"), ("A", "A"), ("TIE", "tie"), ("A", "no idea"))
    assert (agreed.winner, agreed.position_consistent) == ("a", True)  # A first, then (swapped) B: same response
    assert (flipped.winner, flipped.position_consistent) == ("tie", False)  # the first slot won both times
    assert (tied.winner, tied.position_consistent) == ("tie", True)
    assert unreadable.error and unreadable.position_consistent is None
    (dropped,) = verdicts(("A", "A"), on_disagreement="drop")
    assert dropped.winner is None and dropped.position_consistent is False
    assert Verdict("a", raw="score_a=1.0 score_b=0.0").position_consistent is None  # asked once


class ScriptedJudge:
    """Answers from a fixed table keyed by (response_a, response_b)."""

    name = "scripted"

    def __init__(self, table):
        self.table = table

    def compare(self, items):
        return [self.table[(it.response_a, it.response_b)] for it in items]


def test_evaluate_round_keeps_every_verdict_and_is_json_ready():
    prompts = [Prompt(f"p{i}", [{"role": "user", "content": f"{i}+1?"}], str(i + 1)) for i in range(4)]
    current = ["1", "the answer is 3", "3", "5"]
    base = ["0", "2", "3", "4"]
    prev = ["1", "2", "x", "5"]
    usage = Usage(prompt_tokens=10, completion_tokens=1, cost=0.01, calls=2)
    table = {
        ("1", "0"): Verdict("a", raw="AB: 'A' | BA: 'B'", usage=usage, position_consistent=True),
        ("the answer is 3", "2"): Verdict("tie", raw="AB: 'A' | BA: 'A'", usage=usage, position_consistent=False),
        ("3", "3"): Verdict("tie", raw="AB: 'TIE' | BA: 'TIE'", usage=usage, position_consistent=True),
        ("5", "4"): Verdict.failed("timeout", usage=usage),
        ("3", "x"): Verdict("a"),
    }  # ("1", "1"), ("3", "3") and ("5", "5") are identical: ties without asking the judge
    # vs previous, round 1 is judged against "2" again: the table's second entry answers it.
    res = evaluate_round(ScriptedJudge(table), prompts, current, [1, 5, 1, 1], base, prev)
    json.loads(json.dumps(res))  # JSON-serializable as is
    vb = res["vs_baseline"]
    assert (vb["wins"], vb["ties"], vb["errors"]) == (1, 2, 1) and vb["win_rate"] == 2 / 3
    assert vb["judge_calls"] == 6 and abs(vb["judge_cost"] - 0.03) < 1e-12  # the identical pair cost nothing
    assert vb["position_consistency"] == 1 / 2  # one of the two both-orders verdicts asked flipped
    assert 0.0 <= vb["lc_win_rate"] <= 1.0 and "lc_win_rate" not in res  # stored once, per comparison
    assert res["accuracy"] == 0.5  # "1" (0+1) and "3" (2+1) match the references
    items = res["comparisons"]["vs_baseline"]
    assert [i["winner"] for i in items] == ["a", "tie", "tie", None]
    assert items[2]["rationale"] == IDENTICAL
    assert items[3]["error"] == "timeout" and items[1]["position_consistent"] is False
    assert items[1]["chars_a"] == len("the answer is 3") and items[0]["prompt"] == "0+1?"
    assert [i["winner"] for i in res["comparisons"]["vs_previous"]] == ["tie", "tie", "a", "tie"]
    assert res["response_tokens"]["max"] == 5 and res["response_tokens"]["mean"] == 2.0
    assert "mean_response_tokens" not in res  # stored once, in response_tokens


def test_pass_rate_counts_errors_apart_and_gives_wilsons_interval():
    from judges.base import Score
    from online_dpo.evaluate import pass_rate, wilson_interval

    scores = [Score(1.0), Score(0.5), Score(1.0), Score(None, error="timeout"), Score(0.0), Score(float("nan"))]
    got = pass_rate(scores, pass_score=1.0)
    assert (got["n"], got["passed"], got["errors"]) == (6, 2, 2)  # NaN is no score: an error, never a fail
    assert got["pass_rate"] == 0.5 and (got["ci_low"], got["ci_high"]) == wilson_interval(2, 4)
    assert got["mean_score"] == 0.625
    assert pass_rate(scores, pass_score=0.5)["passed"] == 3
    empty = pass_rate([Score(None, error="x")])
    assert empty["errors"] == 1 and math.isnan(empty["pass_rate"])
