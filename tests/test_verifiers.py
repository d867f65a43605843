import pytest

from judges import PointwiseItem, load_judge


def _scores(judge, responses, reference="42"):
    return [s.value if s.error is None else "error" for s in judge.score([PointwiseItem("q", r, reference) for r in responses])]


def test_gsm8k_marker_final_answer():
    assert _scores(load_judge("final_answer"), ["so 6*7\n#### 42", "#### 41 then 42", "42"]) == [1.0, 0.0, 1.0]


def test_regex_with_reference_substitution_and_bad_pattern():
    judge = load_judge("regex", pattern=r"answer is {reference}\b", ignore_case=True)
    assert _scores(judge, ["The ANSWER is 42.", "answer is 420", "42"]) == [1.0, 0.0, 0.0]
    assert _scores(judge, ["answer is 42"], reference=None) == ["error"]
    with pytest.raises(Exception):
        load_judge("regex", pattern="(unclosed")


def test_contains_and_length():
    assert _scores(load_judge("contains"), ["it is 42", "it is 4"]) == [1.0, 0.0]
    assert _scores(load_judge("contains", text="Therefore"), ["therefore 1", "so 1"]) == [1.0, 0.0]
    length = load_judge("length", min_chars=3, max_chars=5, slack=2)
    assert _scores(length, ["ab", "abc", "abcde", "abcdef", "abcdefgh"]) == [0.5, 1.0, 1.0, 0.5, 0.0]


def test_weighted_mixture_and_gate():
    parts = [{"name": "final_answer", "weight": 3}, {"name": "length", "max_chars": 10, "slack": 100}]
    mix = load_judge("mixture", parts=parts)
    assert _scores(mix, ["42", "41"]) == [1.0, 0.25]  # "41": wrong (0 x 3) but short (1 x 1)
    long_right = "x" * 60 + " 42"  # 63 chars: length part scores 1 - 53/100 = 0.47
    assert _scores(mix, [long_right])[0] == pytest.approx((3 * 1.0 + 0.47) / 4)
    gate = load_judge("all_must_pass", parts=parts)
    assert _scores(gate, ["42", "41", long_right]) == [1.0, 0.0, 0.0]
    # a failing part makes the item an error, not a number
    assert _scores(mix, ["42"], reference=None) == ["error"]
    with pytest.raises(ValueError, match="at least one part"):
        load_judge("mixture", parts=[])
