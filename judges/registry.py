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
import inspect
import sys
import traceback
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from judges.base import JudgeError, JudgeLoadError, UnknownJudgeError, as_judge, check_judge
from judges.models import ModelError

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
    "instructions": "judges.instructions:InstructionChecker",
    "noisy": "judges.noisy:NoisyJudge",
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
            except Exception as e:
                del sys.modules[module_name]
                raise load_failure(reference, "loading it", e) from e
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            if e.name and (target == e.name or target.startswith(e.name + ".")):
                raise UnknownJudgeError(f"judge {reference!r}: cannot import {target!r} ({e}); install it, or name "
                                        f"the file instead: judge.name=path/to/{target.rpartition('.')[2]}.py:{attr}") from None
            raise load_failure(reference, "importing it", e) from e  # the module exists; an import inside it failed
        except Exception as e:
            raise load_failure(reference, "importing it", e) from e
    found = getattr(module, attr, None)
    if found is None:
        defined = sorted(n for n, v in vars(module).items() if isinstance(v, type) and v.__module__ == module.__name__)
        raise UnknownJudgeError(f"judge {reference!r}: {target} has no {attr!r}; it defines {', '.join(defined) or 'no class'}")
    return found


def load_failure(reference: str, doing: str, error: Exception) -> JudgeLoadError:
    """A one-line error for a judge's own code that failed: where (its file and line) and what."""
    if isinstance(error, SyntaxError):
        where = f"{error.filename}, line {error.lineno}"
        what = f"SyntaxError: {error.msg}"
    else:
        frame = _innermost_user_frame(error)
        where = f"{frame.filename}, line {frame.lineno}" if frame else "its code"
        what = f"{type(error).__name__}: {error}"
    return JudgeLoadError(f"judge {reference!r} failed while {doing}: {what} ({where}). Fix it there, or the "
                          f"judge.options it was given; `online-dpo --debug ...` shows the whole traceback")


def _innermost_user_frame(error: Exception):
    """The deepest traceback frame outside Python's import machinery (the judge's own line)."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "importlib" not in f.filename]
    return frames[-1] if frames else None


def _parameters(cls) -> str:
    """The keyword options a judge's constructor takes, for an error message ('' if unknown)."""
    try:
        params = [p for p in inspect.signature(cls).parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    except (TypeError, ValueError):
        return ""
    return ", ".join(p.name for p in params) or "no options"


def load_judge(name: str, **options: Any):
    """The judge `name` stands for, built with `options` and checked against the judge protocols.
    A plain function (`module:score_fn`) is a pointwise scorer: fn(prompt, response, reference) -> float."""
    cls = judge_class(name)
    if inspect.isfunction(cls):
        if options:
            raise JudgeLoadError(f"judge {name!r} is a plain function, which takes no options; got {sorted(options)}: "
                                 f"remove judge.options, or make it a class whose __init__ takes them")
        return as_judge(cls, f"judge {name!r}")
    try:
        judge = cls(**options)
    except (JudgeError, ModelError):
        raise  # the judge's own clear error (a missing key, a model it cannot find)
    except Exception as e:
        if isinstance(e, TypeError) and len(traceback.extract_tb(e.__traceback__)) == 1:  # raised by the call itself
            accepts = _parameters(cls)
            raise JudgeLoadError(f"judge {name!r} rejected its options {sorted(options)}: {e}"
                                 + (f"; it takes {accepts}" if accepts else "")) from None
        if name in BUILTIN_JUDGES:  # our own judge refusing what it was given: the options are at fault, not its code
            raise JudgeLoadError(f"judge {name!r} cannot be built from its options {sorted(options)}: "
                                 f"{type(e).__name__}: {e}") from e
        raise load_failure(name, "building it", e) from e
    return check_judge(judge, f"judge {name!r}")
