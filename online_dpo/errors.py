"""Every user-facing error of online-dpo, and the exit code the CLI gives it. Each message
says what is wrong and how to fix it; the CLI prints it without a traceback."""

from __future__ import annotations

from contextlib import contextmanager

from judges.models import ModelError  # a model that cannot be found or loaded: exit code 2 (judges load models too)

__all__ = ["ConfigError", "DataError", "GenerationServerError", "JudgeUnusableError", "LabelledPairsError", "ModelError",
           "OutOfDiskSpace", "ReportError", "RunDirError", "StaleWeightsError", "UserError"]


class UserError(Exception):
    """Input the run cannot use (a config, a data source, a model, a run directory): exit code 2."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A config that cannot be used."""


class DataError(UserError, ValueError):
    """A prompt source that cannot be used."""


class RunDirError(UserError, ValueError):
    """A run directory that cannot be created, resumed or deleted as asked (a folder of the
    user's in its place, a path outside the run)."""


class ReportError(UserError, ValueError):
    """A run directory the report cannot read."""


class LabelledPairsError(UserError, ValueError):
    """A file of human-labelled pairs (for `online-dpo judge-eval`) that cannot be read."""


class OutOfDiskSpace(RuntimeError):
    """The disk filled up mid-run: exit code 4. Every finished stage is saved; free space and resume."""

    exit_code = 4


class GenerationServerError(RuntimeError):
    """A generation server (generation.backend=vllm_server) that is down, timed out or failed a
    request: exit code 5. The message names the server and the stage; every finished stage is
    saved, and `online-dpo resume` continues once the server is back."""

    exit_code = 5

    def __init__(self, url: str, problem: str, where: str = ""):
        self.url, self.problem, self.where = url, problem, where
        super().__init__(self._message())

    def _message(self) -> str:
        at = f" during {self.where}" if self.where else ""
        return f"generation server {self.url}{at}: {self.problem}"

    def during(self, where: str) -> "GenerationServerError":
        """The same error, placed in a round and stage ("round 2 generate")."""
        self.where = where
        self.args = (self._message(),)
        return self


class JudgeUnusableError(RuntimeError):
    """A round its judge could not judge, exit code 6: training judgments that can teach nothing
    (every verdict a tie or an error), or a held-out eval mostly of judge errors. The round stops
    before those judgments are saved, so nothing trains on or is decided by them, and
    `online-dpo resume` judges the round again once the judge is fixed."""

    exit_code = 6

    def __init__(self, r: int, problem: str, stage: str = "judge"):
        if stage == "eval":
            kept, again = ("The round's update and checkpoint are saved; its eval decides nothing yet",
                           "the round's held-out responses")
        else:
            kept, again = "Nothing was trained on it", "the round's saved candidates"
        super().__init__(f"round {r} {stage}: {problem}. {kept}. Fix the judge (its model, template, server or "
                         f"key), then `online-dpo resume RUN_DIR` judges {again} again (an API judge answers from "
                         f"its reply cache the requests it answered before at the same endpoint, model and "
                         f"template: judge.cache=off asks them again).")


class StaleWeightsError(GenerationServerError):
    """A server answered with tokens sampled by other weights than the policy version the round
    was generated from; the candidates are refused rather than trained on."""


@contextmanager
def servers_during(where: str):
    """Place a generation server's failure in the campaign ("round 2", "the baseline eval")."""
    try:
        yield
    except GenerationServerError as e:
        raise e.during(where) from None
