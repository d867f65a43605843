"""The built-in arithmetic task: seeded single- or multi-digit problems, phrased several
ways, split into train and eval by problem (its verifier is `judges.verifiers.ArithmeticVerifier`)."""

from __future__ import annotations

import random

from online_dpo.config import DataConfig
from online_dpo.data.prompts import Prompt, PromptSplit, stable_id
from online_dpo.errors import DataError

_TEMPLATES = [
    "What is {a} {op} {b}?",
    "Compute {a} {op} {b}.",
    "Calculate {a} {op} {b}. Give the final answer as a number.",
]
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def arithmetic_split(cfg: DataConfig) -> PromptSplit:
    """Seeded arithmetic prompts. Problems (a, op, b) are split into eval and train sets
    first, then each problem is phrased with every template, so no eval problem is ever
    seen in training in any phrasing."""
    unknown = [op for op in cfg.ops if op not in _OPS]
    if unknown or not cfg.ops:
        raise DataError(f"data.ops {cfg.ops} must be a non-empty subset of {list(_OPS)}")
    if cfg.digits < 1 or cfg.digits > 4:
        raise DataError("data.digits must be between 1 and 4")
    lo = 0 if cfg.digits == 1 else 10 ** (cfg.digits - 1)
    numbers = range(lo, 10**cfg.digits)
    problems = [(a, op, b) for op in cfg.ops for a in numbers for b in numbers]
    rng = random.Random(cfg.seed)
    rng.shuffle(problems)
    n_eval_problems = max(1, round(len(problems) * cfg.eval_fraction))
    eval_problems, train_problems = problems[:n_eval_problems], problems[n_eval_problems:]

    def render(problem_set: list) -> list[Prompt]:
        out = []
        for a, op, b in problem_set:
            group = f"{a}{op}{b}"
            for t, template in enumerate(_TEMPLATES):
                shown_op = "×" if op == "*" else op
                text = template.format(a=a, op=shown_op, b=b)
                out.append(Prompt(stable_id(cfg.seed, group, t), [{"role": "user", "content": text}],
                                  str(_OPS[op](a, b)), group))
        rng.shuffle(out)
        return out

    eval_prompts = render(eval_problems)[: cfg.eval_prompts]
    return PromptSplit(train=render(train_problems), eval=eval_prompts)
