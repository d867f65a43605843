"""What a round shows of its pairwise judge's quality, from the verdicts of its round robins.

- position consistency: of the verdicts asked in both orders, the share whose two answers
  named the same response (a judge that follows the position, not the content, is at 0);
- ties and errors: the share of verdicts that were ties (a both-orders judge that flipped
  with the order gives one) and that failed;
- agreement with reference answers, where every prompt has a numeric one: on the
  comparisons where exactly one of the two responses is right, the share the judge gave to
  the right one, and the flip rate it implies (a wrong verdict counts 1, a tie 1/2: with
  both orders that is the rate at which a single request names the wrong response);
- the separation test (`judges.ranking.separation_pvalue`): the prompts whose round robin
  separated the candidates beyond chance, at the level the round's test acted at
  (`separation.separation_level`), else at `separation.SEPARATION_LEVEL` (reported only);
  and that level, which `pairs.separation_alpha=auto` chooses from the flip rate's upper
  bound (`flip_rate_bound`).

Everything here is a pure function of saved verdicts; `quality_warnings` says when the
judge looks no better than a coin.
"""

from __future__ import annotations

import math
from collections import defaultdict

from judges.ranking import separation_pvalue
from online_dpo.evaluate import OUTCOME, wilson_interval
from online_dpo.seeds import stable_seed


def separation_pvalues(prompts, candidates, games: list[dict], seed: int) -> list[float | None] | None:
    """Each prompt's round-robin p-value (`judges.ranking.separation_pvalue`), None for a prompt
    with no verdicts; None when the round has no round robins (a pointwise judge)."""
    if not games:
        return None
    by_prompt = defaultdict(list)
    for g in games:
        if g["error"] is None:
            by_prompt[g["prompt_id"]].append(((g["i"], g["j"]), OUTCOME[g["winner"]]))
    out = []
    for p, cands in zip(prompts, candidates, strict=True):
        played = by_prompt.get(p.id)
        if not played:
            out.append(None)
            continue
        pairs, outcomes = zip(*played)
        out.append(separation_pvalue(len(cands), list(pairs), list(outcomes), seed=stable_seed(seed, p.id)))
    return out


def judge_quality(games: list[dict], correct: dict[tuple[str, int], float] | None,
                  separated: int | None = None, tested: int | None = None,
                  separation_level: float | None = None) -> dict | None:
    """The round's judge-quality summary (see the module docstring), or None without verdicts.

    games: comparisons.parquet's rows {prompt_id, i, j, winner, error, position_consistent};
    correct: (prompt_id, candidate index) -> 1.0 / 0.0 against the reference (None: no references);
    separated / tested: prompts whose round robin passed the separation test, of those tested;
    separation_level: the level the round's test acted at on the pairs (1.0: off).
    """
    if not games:
        return None
    answered = [g for g in games if g["error"] is None]
    both = [g["position_consistent"] for g in answered if g.get("position_consistent") is not None]
    out = {
        "comparisons": len(games),
        "errors": len(games) - len(answered),
        "tie_rate": _share(sum(g["winner"] == "tie" for g in answered), len(answered)),
        "position_consistency": _share(sum(both), len(both)),
        "inconsistent_rate": _share(len(both) - sum(both), len(both)),
        "separated_prompts": separated,
        "tested_prompts": tested,
        "separation_level": separation_level,
    }
    if correct is not None:
        out["vs_reference"] = agreement(answered, correct)
    return out


def agreement(answered: list[dict], correct: dict[tuple[str, int], float]) -> dict:
    """On the comparisons where exactly one response is right: how often the judge picked it.

    accuracy counts a tie as half (so a coin is 0.5); flip_rate = 1 - accuracy is the
    per-request error rate of a both-orders judge (a wrong verdict is two wrong answers, a
    tie one); interval: Wilson's 95% on accuracy."""
    decisive = right = ties = 0
    for g in answered:
        a, b = correct[(g["prompt_id"], g["i"])], correct[(g["prompt_id"], g["j"])]
        if a == b:
            continue
        decisive += 1
        truth = "a" if a > b else "b"
        right += g["winner"] == truth
        ties += g["winner"] == "tie"
    if not decisive:
        return {"decisive": 0, "accuracy": None, "flip_rate": None, "interval": None}
    points = right + 0.5 * ties
    low, high = wilson_interval(points, decisive)
    return {"decisive": decisive, "accuracy": points / decisive, "flip_rate": 1 - points / decisive,
            "interval": [low, high], "ties": ties}


def flip_rate_bound(reference: dict | None) -> float | None:
    """The 95% upper bound of the judge's flip rate against the references (`agreement`'s
    result), or None where nothing measured it (no references, no decisive comparison)."""
    if not reference or not reference.get("decisive"):
        return None
    return 1.0 - reference["interval"][0]


def quality_warnings(quality: dict | None, alpha: float | None) -> list[str]:
    """Warnings for a judge that looks no better than chance."""
    if not quality:
        return []
    warnings = []
    ref = quality.get("vs_reference") or {}
    if ref.get("decisive", 0) >= 20 and ref["interval"][0] <= 0.5:
        warnings.append(f"the judge picked the right response in {ref['accuracy']:.0%} of {ref['decisive']} "
                        f"comparisons where the reference answers tell (95% CI {ref['interval'][0]:.0%}-"
                        f"{ref['interval'][1]:.0%}): no better than a coin; check its template and model")
    tested, separated = quality.get("tested_prompts"), quality.get("separated_prompts")
    if alpha is not None and alpha < 1 and tested and tested >= 8 and separated <= alpha * tested:
        warnings.append(f"the judge separated the candidates of {separated} of {tested} prompts at p <= {alpha:g}, no "
                        f"more than chance would: its rankings look like noise, or every candidate is equally good")
    return warnings


def summary(quality: dict | None) -> str:
    """One log line, e.g. 'judge: 672 comparisons, 0 errors, ties 55%, position consistency 45%; vs references: ...'."""
    if not quality:
        return ""
    parts = [f"{quality['comparisons']} comparisons", f"{quality['errors']} errors", f"ties {_pct(quality['tie_rate'])}"]
    if quality["position_consistency"] is not None:
        parts.append(f"position consistency {_pct(quality['position_consistency'])}")
    if quality["tested_prompts"]:
        parts.append(f"separated {quality['separated_prompts']}/{quality['tested_prompts']} prompts")
    level = quality.get("separation_level")
    if level is not None:
        parts.append("separation test off" if level >= 1.0 else f"separation test at {level:g}")
    line = "judge: " + ", ".join(parts)
    ref = quality.get("vs_reference")
    if ref and ref["decisive"]:
        line += (f"; vs references: right {_pct(ref['accuracy'])} of {ref['decisive']} decisive comparisons "
                 f"(flip rate {ref['flip_rate']:.2f})")
    return line


def _share(k: float, n: int) -> float | None:
    return k / n if n else None


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.0%}"
