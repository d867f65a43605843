"""Judges defined in a test file, loaded by reference (`tests.custom_judges:Class` or
`tests/custom_judges.py:Class`) or passed to the Python API as objects and functions."""

from judges import Score


class CorrectFirst:
    """Pointwise: a response whose last number equals the reference scores 1, else 0;
    `bonus` is added to correct ones (to show the options reach the judge)."""

    name = "correct_first"

    def __init__(self, bonus: float = 0.0):
        self.bonus = bonus

    def score(self, items):
        out = []
        for it in items:
            words = [w.strip(".,!") for w in it.response.split()]
            numbers = [w for w in words if w.lstrip("-").isdigit()]
            out.append(Score(1.0 + self.bonus if numbers and numbers[-1] == it.reference else 0.0))
        return out


class NotAJudgeAtAll:
    """Has a name but neither compare() nor score()."""

    name = "nothing"


def shorter_is_better(prompt, response, reference):
    """A plain scoring function: the shorter response wins; fails on an empty one."""
    if not response:
        raise ValueError("empty response")
    return -float(len(response))


class BreaksAfterCalls:
    """Pointwise, the shorter response scores higher; every call after the first `fine_calls` of
    this process raises: a judge that judges a round's candidates, then fails on its held-out eval."""

    name = "breaks_after_calls"

    def __init__(self, fine_calls: int = 1):
        self.fine_calls, self.calls = fine_calls, 0

    def score(self, items):
        self.calls += 1
        if self.calls > self.fine_calls:
            raise ConnectionError("the judge's server went away")
        return [Score(-float(len(it.response))) for it in items]
