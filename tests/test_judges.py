import pytest

from judges import PairwiseItem, PointwiseItem, ScorerAsPairwise, Verdict, available_judges, load_judge
from judges.ranking import CandidateGroup, score_groups
from judges.registry import UnknownJudgeError
from judges.verifiers import final_number


def test_final_number_extraction():
    assert final_number("3 + 4 = 7.") == 7
    assert final_number("The answer is 1,234") == 1234
    assert final_number("first 3 then #### 42 and 9") == 42  # GSM8K marker wins
    assert final_number("-5 is the result") == -5
    assert final_number("no digits here") is None


def test_arithmetic_verifier_scores_and_errors_on_missing_reference():
    v = load_judge("arithmetic")
    s = v.score([PointwiseItem("2+3?", "It is 5", "5"), PointwiseItem("2+3?", "It is 6", "5"),
                 PointwiseItem("2+3?", "five", "5"), PointwiseItem("2+3?", "5", None)])
    assert [x.value for x in s[:3]] == [1.0, 0.0, 0.0]
    assert s[3].value is None and "reference" in s[3].error


def test_scorer_as_pairwise_ties_and_errors_are_not_wins():
    judge = ScorerAsPairwise(load_judge("arithmetic"))
    v = judge.compare([
        PairwiseItem("2+3?", "5", "6", "5"),   # a right
        PairwiseItem("2+3?", "6", "5", "5"),   # b right
        PairwiseItem("2+3?", "5", "5", "5"),   # both right: tie
        PairwiseItem("2+3?", "1", "2", "5"),   # both wrong: tie
        PairwiseItem("2+3?", "5", "6", None),  # cannot verify: error
    ])
    assert [x.winner for x in v] == ["a", "b", "tie", "tie", None]
    assert v[4].error is not None


def test_verdict_must_have_winner_xor_error():
    with pytest.raises(ValueError):
        Verdict(winner="a", error="boom")
    with pytest.raises(ValueError):
        Verdict(winner=None)


def test_unknown_judge_lists_known_ones():
    with pytest.raises(UnknownJudgeError) as e:
        load_judge("gpt-judge-9000")
    assert "arithmetic" in str(e.value) and "online_dpo.judges" in str(e.value)
    assert "arithmetic" in available_judges()


class _LengthJudge:
    """Pairwise judge preferring the longer response; errors when a response is 'ERR'."""

    name = "longer"

    def compare(self, items):
        out = []
        for it in items:
            if "ERR" in (it.response_a, it.response_b):
                out.append(Verdict.failed("boom"))
            elif len(it.response_a) == len(it.response_b):
                out.append(Verdict("tie"))
            else:
                out.append(Verdict("a" if len(it.response_a) > len(it.response_b) else "b"))
        return out


def test_round_robin_scores_from_a_pairwise_judge():
    scores, verdicts = score_groups(_LengthJudge(), [CandidateGroup("p", ["aaa", "a", "aa", "ERR"])])
    assert len(verdicts) == 6
    vals = [s.value for s in scores[0]]
    # ERR's comparisons all fail, so it gets an error, and the others' scores ignore them
    assert vals[:3] == [1.0, 0.0, 0.5]
    assert scores[0][3].value is None and scores[0][3].error
