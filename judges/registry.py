"""Lazy judge registry.

Built-in names map to "module:Class" strings, imported only when chosen (so `openai`
or `vllm` load only for the judges that need them). Third-party packages add judges
through the entry-point group `online_dpo.judges`:

    [project.entry-points."online_dpo.judges"]
    my_judge = "my_pkg.judge:MyJudge"
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

ENTRY_POINT_GROUP = "online_dpo.judges"

BUILTIN_JUDGES: dict[str, str] = {
    "arithmetic": "judges.verifiers:ArithmeticVerifier",
    "final_answer": "judges.verifiers:FinalAnswerVerifier",
    "regex": "judges.verifiers:RegexVerifier",
    "contains": "judges.verifiers:ContainsVerifier",
    "length": "judges.verifiers:LengthVerifier",
    "mixture": "judges.verifiers:WeightedMixture",
    "all_must_pass": "judges.verifiers:AllMustPass",
    "openai": "judges.openai_judge:OpenAIJudge",
    "openai_rubric": "judges.openai_judge:OpenAIRubricScorer",
    "vllm_judge": "judges.vllm_judge:VLLMJudge",
    "reward_model": "judges.reward_model:RewardModelScorer",
}


class UnknownJudgeError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; this one is meant to be read
        return str(self.args[0])


def _plugin_judges() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_judges() -> list[str]:
    return sorted(set(BUILTIN_JUDGES) | set(_plugin_judges()))


def judge_class(name: str) -> type:
    if name in BUILTIN_JUDGES:
        module_name, _, attr = BUILTIN_JUDGES[name].partition(":")
        return getattr(importlib.import_module(module_name), attr)
    plugins = _plugin_judges()
    if name in plugins:
        return plugins[name].load()
    raise UnknownJudgeError(
        f"unknown judge {name!r}. Known judges: {', '.join(available_judges())}. "
        f"Third-party judges register under the entry-point group {ENTRY_POINT_GROUP!r}."
    )


def load_judge(name: str, **options: Any):
    cls = judge_class(name)
    try:
        return cls(**options)
    except TypeError as e:
        raise TypeError(f"judge {name!r} rejected its options {sorted(options)}: {e}") from None
