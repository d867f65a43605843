"""A judge of your own without packaging it: `judge.name` takes `package.module:Class` or
`path/to/file.py:Class`, a plain scoring function becomes a judge, and a plugin that is not a
judge, or a misspelt name, is refused at load with what to do instead."""

import pytest

from judges import FunctionScorer, NotAJudge, PairwiseItem, PointwiseItem, Score, UnknownJudgeError, as_judge, as_pairwise
from judges.registry import load_judge
from tests.conftest import ROOT

ITEMS = [PointwiseItem("2+2?", "It is 4.", "4"), PointwiseItem("2+2?", "It is 5.", "4")]


@pytest.mark.parametrize("name", ["tests.custom_judges:CorrectFirst", f"{ROOT}/tests/custom_judges.py:CorrectFirst",
                                  "tests/custom_judges.py:CorrectFirst"])
def test_a_judge_class_is_loaded_by_module_or_file_reference_with_its_options(name, monkeypatch):
    monkeypatch.chdir(ROOT)  # a relative file reference is read from where the campaign runs
    judge = load_judge(name, bonus=0.5)
    assert type(judge).__name__ == "CorrectFirst" and judge.bonus == 0.5
    assert [s.value for s in judge.score(ITEMS)] == [1.5, 0.0]
    assert [v.winner for v in as_pairwise(judge).compare([PairwiseItem("2+2?", "4", "5", "4")])] == ["a"]


def test_a_file_reference_loads_its_module_once():
    first = load_judge(f"{ROOT}/tests/custom_judges.py:CorrectFirst")
    second = load_judge(f"{ROOT}/tests/custom_judges.py:CorrectFirst")
    assert type(first) is type(second)


def test_references_that_lead_nowhere_say_what_is_there(tmp_path):
    with pytest.raises(UnknownJudgeError, match="no file"):
        load_judge(f"{tmp_path}/missing.py:Judge")
    with pytest.raises(UnknownJudgeError, match=r"has no 'Nope'; it defines BreaksAfterCalls, CorrectFirst, NotAJudgeAtAll"):
        load_judge("tests.custom_judges:Nope")
    with pytest.raises(UnknownJudgeError, match="cannot import 'no_such_pkg.judges'.*path/to/judges.py:J"):
        load_judge("no_such_pkg.judges:J")


def test_a_plugin_that_is_not_a_judge_is_refused_at_load():
    from tests.custom_judges import CorrectFirst

    with pytest.raises(NotAJudge, match=r"NotAJudgeAtAll, which is not a judge: it has no compare\(items\) or score"):
        load_judge("tests.custom_judges:NotAJudgeAtAll")
    with pytest.raises(NotAJudge, match=r"the class CorrectFirst; pass an instance of it, e.g. CorrectFirst\(\)"):
        as_judge(CorrectFirst)


def test_a_misspelt_judge_name_gets_a_suggestion_and_the_list():
    with pytest.raises(UnknownJudgeError) as e:
        load_judge("arithmatic")
    message = str(e.value)
    assert "did you mean 'arithmetic'?" in message and "Available: " in message and "openai" in message
    assert "path/to/judge.py:MyJudge" in message and "online_dpo.judges" in message


def test_a_run_judged_by_a_python_object_cannot_be_resumed_by_name():
    with pytest.raises(UnknownJudgeError, match=r"online_dpo.resume\(run_dir, judge=...\)"):
        load_judge("python:shorter_is_better")


def test_a_plain_function_is_a_pointwise_judge_whose_failures_are_counted_apart():
    from tests.custom_judges import shorter_is_better

    judge = as_judge(shorter_is_better)
    assert isinstance(judge, FunctionScorer) and judge.name == "shorter_is_better"
    scores = judge.score([PointwiseItem("q", "ab", None), PointwiseItem("q", "", None)])
    assert scores[0].value == -2.0 and scores[1].value is None and "ValueError: empty response" in scores[1].error
    not_numbers = as_judge(lambda p, r, ref: None if r == "a" else "high")
    assert [s.error for s in not_numbers.score([PointwiseItem("q", "a", None), PointwiseItem("q", "b", None)])] == [
        "<lambda> returned None, not a number", "<lambda> returned 'high', not a number"]
    verdicts = as_pairwise(judge).compare([PairwiseItem("q", "short", "longer"), PairwiseItem("q", "", "x")])
    assert verdicts[0].winner == "a" and verdicts[1].winner is None  # an error is neither a win nor a loss


PLAIN = """
from judges import Score


class LongerIsBetter:
    def score(self, items):
        return [Score(float(len(it.response))) for it in items]


def by_length(prompt, response, reference):
    return float(len(response))
"""


def test_a_plain_class_without_a_name_and_a_plain_function_are_judges(tmp_path):
    path = tmp_path / "my_judge.py"
    path.write_text(PLAIN)
    judge = load_judge(f"{path}:LongerIsBetter")
    assert judge.name == "LongerIsBetter"
    assert [s.value for s in judge.score(ITEMS)] == [8.0, 8.0]
    scorer = load_judge(f"{path}:by_length")
    assert isinstance(scorer, FunctionScorer) and scorer.name == "by_length"
    assert as_judge(judge).name == "LongerIsBetter"  # the Python API's judge= takes it as it is too


BROKEN = {
    "syntax": ("class J:\n    def score(self, items)\n        return []\n", "SyntaxError: expected ':'", 2, "loading"),
    "import": ("import no_such_module_xyz\n\nclass J:\n    def score(self, items): return []\n",
               "ModuleNotFoundError: No module named 'no_such_module_xyz'", 1, "loading"),
    "raises": ("x = 1\n\n\nclass J:\n    def __init__(self):\n        raise RuntimeError('weights missing')\n\n"
               "    def score(self, items): return []\n", "RuntimeError: weights missing", 6, "building"),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_a_judge_whose_own_code_fails_gets_one_line_naming_its_file_and_line(kind, tmp_path):
    from judges.base import JudgeLoadError

    source, what, line, doing = BROKEN[kind]
    path = tmp_path / f"judge_{kind}.py"
    path.write_text(source)
    with pytest.raises(JudgeLoadError) as e:
        load_judge(f"{path}:J")
    message = str(e.value)
    assert f"failed while {doing} it: {what}" in message and f"({path}, line {line})" in message
    assert "--debug" in message and "\n" not in message


def test_options_a_judge_does_not_take_are_named_with_those_it_does(tmp_path):
    from judges.base import JudgeLoadError

    with pytest.raises(JudgeLoadError, match=r"rejected its options \['bogus'\].*it takes truth, flip_rate"):
        load_judge("noisy", bogus=1)
    path = tmp_path / "my_judge.py"
    path.write_text(PLAIN)
    with pytest.raises(JudgeLoadError, match="plain function, which takes no options"):
        load_judge(f"{path}:by_length", weight=2)


def test_the_cli_gives_exit_2_and_one_line_for_a_broken_judge_file_and_the_traceback_with_debug(tmp_path):
    from tests.conftest import run_python

    path = tmp_path / "judge_syntax.py"
    path.write_text(BROKEN["syntax"][0])
    args = ["-m", "online_dpo.cli", "run", "configs/quickstart.yaml", f"output_dir={tmp_path}", f"judge.name={path}:J"]
    plain = run_python(args, timeout=300)
    assert plain.returncode == 2, plain.stderr[-2000:]
    errors = [line for line in plain.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: judge '{path}:J' failed while loading it: SyntaxError: expected ':' ({path}, line 2). "
                      f"Fix it there, or the judge.options it was given; `online-dpo --debug ...` shows the whole "
                      f"traceback"]
    assert "Traceback" not in plain.stderr
    # nothing was finished, so nothing is kept: the same command starts afresh once the judge is fixed
    assert not (tmp_path / "quickstart").exists()
    debug = run_python(["-m", "online_dpo.cli", "--debug", *args[2:]], timeout=300)
    assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr
    assert "SyntaxError: expected ':'" in debug.stderr and "already holds a run" not in debug.stderr


class RaisesOnSeven:
    """Pointwise; raises (a bug in a user's judge) on any batch with a response containing 7."""

    def score(self, items):
        if any("7" in it.response for it in items):
            raise KeyError("seven")
        return [Score(1.0) for _ in items]


def test_a_judge_that_raises_during_a_round_counts_errors_never_wins_and_says_so_once(caplog):
    import logging

    from judges.base import BudgetExceeded, compare_distinct
    from judges.ranking import CandidateGroup, score_groups

    judge = as_judge(RaisesOnSeven())
    with caplog.at_level(logging.WARNING, logger="judges"):
        for _ in range(3):
            scores, _ = score_groups(judge, [CandidateGroup("3+4?", ["7", "8"], "7")])
            assert [s.value for s in scores[0]] == [None, None]
            assert scores[0][0].error == "RaisesOnSeven raised KeyError: 'seven'"
        verdicts = compare_distinct(as_pairwise(judge), [PairwiseItem("3+4?", "7", "8", "7"),
                                                         PairwiseItem("1+1?", "2", "3", "2")])
    assert [v.winner for v in verdicts] == [None, None] and all("KeyError" in v.error for v in verdicts)
    shown = [r for r in caplog.records if "RaisesOnSeven raised KeyError" in r.getMessage()]
    assert len(shown) == 1 and "never as wins or losses" in shown[0].getMessage()
    assert [s.value for s in score_groups(judge, [CandidateGroup("1+1?", ["2", "3"], "2")])[0][0]] == [1.0, 1.0]

    class OverBudget:
        def score(self, items):
            raise BudgetExceeded("judge budget reached")

    with pytest.raises(BudgetExceeded):  # a judge's own stop still stops the campaign
        score_groups(as_judge(OverBudget()), [CandidateGroup("q", ["a", "b"])])
