"""Every user-facing error of online-dpo, and the exit code the CLI gives it. Each message
says what is wrong and how to fix it; the CLI prints it without a traceback."""

from __future__ import annotations

from judges.models import ModelError  # a model that cannot be found or loaded: exit code 2 (judges load models too)

__all__ = ["ConfigError", "DataError", "LabelledPairsError", "ModelError", "OutOfDiskSpace", "ReportError", "UserError"]


class UserError(Exception):
    """Input the run cannot use (a config, a data source, a model, a run directory): exit code 2."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A config that cannot be used."""


class DataError(UserError, ValueError):
    """A prompt source that cannot be used."""


class ReportError(UserError, ValueError):
    """A run directory the report cannot read."""


class LabelledPairsError(UserError, ValueError):
    """A file of human-labelled pairs (for `online-dpo judge-eval`) that cannot be read."""


class OutOfDiskSpace(RuntimeError):
    """The disk filled up mid-run: exit code 4. Every finished stage is saved; free space and resume."""

    exit_code = 4
