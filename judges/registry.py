"""Lazy judge registry: a judge name -> a judge, checked against the judge protocols.

Built-in names map to "module:Class" strings, imported only when chosen (so `openai`
or `vllm` load only for the judges that need them). A judge of your own is named by
reference, `my_pkg.judge:MyJudge` or `path/to/judge.py:MyJudge`, or registered by an
installed package under the entry-point group `online_dpo.judges`:

    [project.entry-points."online_dpo.judges"]
    my_judge = "my_pkg.judge:MyJudge"
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from judges.base import UnknownJudgeError, check_judge

ENTRY_POINT_GROUP = "online_dpo.judges"
PYTHON_JUDGE_PREFIX = "python:"  # judge.name of a run whose judge was passed to the Python API as an object

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


def _plugin_judges() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_judges() -> list[str]:
    return sorted(set(BUILTIN_JUDGES) | set(_plugin_judges()))


def judge_class(name: str) -> type:
    """The class (or factory) `name` stands for: a built-in, an entry point, or a reference."""
    if name in BUILTIN_JUDGES:
        module_name, _, attr = BUILTIN_JUDGES[name].partition(":")
        return getattr(importlib.import_module(module_name), attr)
    plugins = _plugin_judges()
    if name in plugins:
        return plugins[name].load()
    if name.startswith(PYTHON_JUDGE_PREFIX):
        raise UnknownJudgeError(
            f"this run was judged by {name[len(PYTHON_JUDGE_PREFIX):]!r}, an object passed to online_dpo.run(judge=...); "
            f"continue it from Python with online_dpo.resume(run_dir, judge=...), passing the same judge")
    if ":" in name:
        return _by_reference(name)
    close = difflib.get_close_matches(name, available_judges(), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UnknownJudgeError(
        f"unknown judge {name!r}; {hint}Available: {', '.join(available_judges())}. A judge of your own: "
        f"judge.name=my_pkg.module:MyJudge or judge.name=path/to/judge.py:MyJudge, or an installed package's entry "
        f"point in the group {ENTRY_POINT_GROUP!r}.")


def _by_reference(reference: str) -> type:
    """`package.module:Class` (importable) or `path/to/file.py:Class` (loaded from the file)."""
    target, _, attr = reference.rpartition(":")
    if target.endswith(".py"):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise UnknownJudgeError(f"judge {reference!r}: there is no file {path}")
        # A stable module name per file, so pickling and a second load see the same module.
        module_name = f"online_dpo_judge_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
        module = sys.modules.get(module_name)
        if module is None:
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[module_name]
                raise
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            raise UnknownJudgeError(f"judge {reference!r}: cannot import {target!r} ({e}); install it, or name "
                                    f"the file instead: judge.name=path/to/{target.rpartition('.')[2]}.py:{attr}") from None
    found = getattr(module, attr, None)
    if found is None:
        defined = sorted(n for n, v in vars(module).items() if isinstance(v, type) and v.__module__ == module.__name__)
        raise UnknownJudgeError(f"judge {reference!r}: {target} has no {attr!r}; it defines {', '.join(defined) or 'no class'}")
    return found


def load_judge(name: str, **options: Any):
    """The judge `name` stands for, built with `options` and checked against the judge protocols."""
    cls = judge_class(name)
    try:
        judge = cls(**options)
    except TypeError as e:
        raise TypeError(f"judge {name!r} rejected its options {sorted(options)}: {e}") from None
    return check_judge(judge, f"judge {name!r}")
