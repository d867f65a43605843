"""The separation test's level: what `pairs.separation_alpha` comes to in each round of a
pairwise judge, from the round's own verdicts, and the log's lines that say so.

A prompt counts as separated where a judge that could not tell its candidates apart would
spread their round-robin scores this far with probability at most the level
(`judges.ranking.separation_pvalue`); `pairs.select_pairs` acts on the prompts that are not
(`is_unseparated`), as `pairs.unseparated` says. auto turns the test off for a round whose
verdicts show the judge nearly exact against the reference answers and on otherwise, since a
judge not shown exact (an LLM judge on a task without references) may rank noise.
"""

from __future__ import annotations

from judges.ranking import smallest_separation_pvalue
from online_dpo.config import PairsConfig

# The separation test's level studied (bench/README.md "Judge noise"): what auto acts at, and
# the level the judge-quality summary reports at while the test is off.
SEPARATION_LEVEL = 0.2
# auto leaves the test off for a round whose verdicts show the judge nearly exact: against the
# reference answers, the 95% upper bound of its flip rate on decisive comparisons below this.
# An exact judge's round robin is already a clean ranking; the test would only take the NLL
# term off prompts whose candidates are equally good.
EXACT_JUDGE_FLIP_RATE = 0.05


def separation_level(cfg: PairsConfig, candidates: int, flip_rate_bound: float | None) -> float:
    """The level the separation test acts at in one round of a pairwise judge (1.0: off).

    A level set by hand is that level. auto: off where the round's verdicts show the judge
    nearly exact (`flip_rate_bound`, the 95% upper bound of its flip rate on the comparisons
    the reference answers decide, below EXACT_JUDGE_FLIP_RATE) or where no ranking of
    `candidates` can reach the level; else SEPARATION_LEVEL, so a judge not shown exact (no
    reference answers, or too few decisive comparisons: None) gets the test.
    """
    if cfg.separation_alpha != "auto":
        return float(cfg.separation_alpha)
    if shown_exact(flip_rate_bound):
        return 1.0
    return SEPARATION_LEVEL if smallest_separation_pvalue(candidates) <= SEPARATION_LEVEL else 1.0


def shown_exact(flip_rate_bound: float | None) -> bool:
    """Whether a round's verdicts show the judge nearly exact: its flip rate's 95% upper bound
    against the reference answers is below EXACT_JUDGE_FLIP_RATE (None: not measured)."""
    return flip_rate_bound is not None and flip_rate_bound < EXACT_JUDGE_FLIP_RATE


def explain_level(cfg: PairsConfig, level: float, flip_rate_bound: float | None, reference: dict | None) -> str:
    """The log's line on what pairs.separation_alpha=auto came to in one round (`separation_level`),
    and from what evidence; "" where the level was set by hand or auto is off for too few
    candidates (the campaign's first lines say those)."""
    exact = shown_exact(flip_rate_bound)
    if cfg.separation_alpha != "auto" or (level >= 1.0 and not exact):
        return ""
    chosen = "off" if level >= 1.0 else f"{level:g}"
    if reference and reference.get("decisive"):
        seen = (f"on the {reference['decisive']} comparisons the reference answers decide, the judge's flip rate "
                f"was {reference['flip_rate']:.0%} (95% CI up to {flip_rate_bound:.0%})")
        why = f"below {EXACT_JUDGE_FLIP_RATE:.0%}: a nearly exact judge" if exact else \
            f"not shown below {EXACT_JUDGE_FLIP_RATE:.0%}"
        return f"pairs.separation_alpha=auto -> {chosen}: {seen}, {why}"
    why = ("no reference answers tell how often the judge is wrong" if reference is None else
           "no comparison the reference answers decide")
    return f"pairs.separation_alpha=auto -> {chosen}: {why}, so the judge is not shown exact"


def is_unseparated(p_value: float | None, level: float) -> bool:
    """Whether the judge's round robin over a prompt's candidates did not separate them beyond
    chance: its p-value is above the round's `level`. Never for a prompt not tested (p_value
    None: a scorer's scores) or with the test off (level 1.0)."""
    return p_value is not None and level < 1.0 and p_value > level


def reported_separation_level(level: float, candidates: int) -> float | None:
    """The level the judge-quality summary counts separated prompts at: the round's own where
    the test acts (`level` < 1), else SEPARATION_LEVEL; None where no ranking of that many
    candidates can reach it."""
    level = level if level < 1.0 else SEPARATION_LEVEL
    return level if smallest_separation_pvalue(candidates) <= level else None


def explain_separation_alpha(cfg: PairsConfig, pairwise_judge: bool, samples_per_prompt: int) -> tuple[str, bool]:
    """The log's line on pairs.separation_alpha and pairs.unseparated: what they come to for this
    campaign's judge and K, and why; and whether that deserves a warning (a level set by hand
    that no ranking of K candidates can reach)."""
    setting = cfg.separation_alpha
    if not pairwise_judge:
        return (f"pairs.separation_alpha={setting}: not applied (the judge scores each response, as a verifier or a "
                f"scorer does: equal scores are ties already)"), False
    effect = ("gives no pair (pairs.unseparated=drop)" if cfg.unseparated == "drop" else
              "gives its pair without the chosen response's NLL term (pairs.unseparated=no_nll)")
    floor = smallest_separation_pvalue(samples_per_prompt)
    if setting == "auto":
        if floor > SEPARATION_LEVEL:
            return (f"pairs.separation_alpha=auto -> off: with {samples_per_prompt} candidates per prompt no ranking "
                    f"reaches p <= {SEPARATION_LEVEL:g}, so every prompt whose round robin ranks its candidates gives "
                    f"a pair with the chosen response's NLL term"), False
        return (f"pairs.separation_alpha=auto: each round, a prompt whose round robin does not separate its "
                f"candidates beyond chance (p > {SEPARATION_LEVEL:g}) {effect}, unless the round's verdicts show "
                f"the judge nearly exact against the reference answers (flip rate below "
                f"{EXACT_JUDGE_FLIP_RATE:.0%} at 95%), where every pair keeps it; a judge not shown exact gets "
                f"the test (bench/README.md \"Judge noise\")"), False
    alpha = float(setting)
    if floor > alpha:
        every = "drops every prompt" if cfg.unseparated == "drop" else "catches every prompt: each one " + effect
        return (f"pairs.separation_alpha={setting} {every}: with {samples_per_prompt} candidates per prompt "
                f"even a perfectly consistent ranking has p >= {floor:.2g}. Raise generation.samples_per_prompt "
                f"(6 or more), or set pairs.separation_alpha=auto"), True
    if alpha >= 1.0:
        return (f"pairs.separation_alpha={setting}: off, every prompt whose round robin ranks its candidates "
                f"gives a pair"), False
    return (f"pairs.separation_alpha={setting}: a prompt whose round robin does not separate its candidates beyond "
            f"chance {effect}"), False
