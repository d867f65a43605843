import math

from judges import Verdict
from online_dpo.evaluate import win_rate


def test_win_rate_counts_ties_half_and_errors_apart():
    v = [Verdict("a")] * 6 + [Verdict("b")] * 2 + [Verdict("tie")] * 2 + [Verdict.failed("timeout")] * 5
    r = win_rate(v)
    assert (r["wins"], r["losses"], r["ties"], r["errors"], r["n"]) == (6, 2, 2, 5, 15)
    assert r["win_rate"] == (6 + 1) / 10  # errors are not in the denominator
    assert r["error_rate"] == 5 / 15 and r["tie_rate"] == 2 / 15
    # outcomes: six 1s, two 0s, two 0.5s: mean .7, sample var = (6*.09 + 2*.49 + 2*.04)/9
    half = 1.959963984540054 * math.sqrt((6 * 0.09 + 2 * 0.49 + 2 * 0.04) / 9 / 10)
    assert abs(r["ci_low"] - (0.7 - half)) < 1e-9 and abs(r["ci_high"] - (0.7 + half)) < 1e-9


def test_all_errors_gives_no_win_rate():
    r = win_rate([Verdict.failed("x")] * 3)
    assert math.isnan(r["win_rate"]) and r["error_rate"] == 1.0
