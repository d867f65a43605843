"""Where a run's wall time went: each stage's seconds and share, from the timings the
campaign records per round (eval.json "timings") and its own setup and baseline eval."""

from __future__ import annotations

# A campaign's stages in the order they run: `setup` and `baseline eval` once, the rest per
# round, named as `online_dpo.campaign.timed` names them in a round's timings.
STAGE_ORDER = ("setup", "baseline eval", "generate", "judge", "reference", "update", "drift", "sync", "checkpoint",
               "eval")


def stage_shares(seconds: dict[str, float], wall_s: float) -> list[tuple[str, float, float]]:
    """(stage, seconds, share of wall_s) per stage that took time, in running order, then any
    stage not in STAGE_ORDER, then `other`: the wall time no stage accounts for (pair
    selection, the tables, waits between stages)."""
    known = [name for name in STAGE_ORDER if seconds.get(name)]
    names = known + sorted(set(seconds) - set(STAGE_ORDER))
    rows = [(name, seconds[name], seconds[name] / wall_s) for name in names if seconds[name] > 0]
    other = wall_s - sum(t for _, t, _ in rows)
    if other > 0:
        rows.append(("other", other, other / wall_s))
    return rows
