"""The report's tables as plain cell strings, one list per row, for every renderer to share
(the terminal's per-round, diversity and judge tables, and report.html's)."""

from __future__ import annotations

from online_dpo.report.view import (
    RoundView,
    finite,
    judge_cost,
    judge_error_counts,
    logp_drift,
    mean_tokens,
    p90_tokens,
    position_consistency,
    train_summary,
)

COLUMNS = ("round", "win rate (95% CI)", "LC win", "ties", "errors", "vs prev (95% CI)", "pass rate (95% CI)",
           "len mean/p90", "pairs", "DPO loss", "margin", "pair acc", "KL", "Δlogp c/r", "consist.", "judge cost",
           "judge errors", "wall s", "warnings")


# The per-round table of a campaign and `online-dpo report`: what a user decides on, in 120 columns
# (the warnings in full under it). COLUMNS is the wide view (`report --wide`, report.html).
SUMMARY_COLUMNS = ("round", "win rate vs initial (95% CI)", "vs previous (95% CI)", "pass rate (95% CI)", "pairs",
                   "judge errors", "wall s", "warnings")


def summary_rows(rounds: list[RoundView]) -> list[list[str]]:
    """table_rows cut to SUMMARY_COLUMNS; the warnings cell counts them (they are listed below the table)."""
    keep = [COLUMNS.index(c) for c in ("round", "win rate (95% CI)", "vs prev (95% CI)", "pass rate (95% CI)", "pairs",
                                       "judge errors", "wall s")]
    return [[row[i] for i in keep] + [str(len(v.warnings)) if v.warnings else "-"]
            for v, row in zip(rounds, table_rows(rounds))]


def pct(x: float | None) -> str:
    x = finite(x)
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = ".3f") -> str:
    x = finite(x)
    return "-" if x is None else format(x, fmt)


def _with_ci(d: dict | None) -> str:
    rate = finite((d or {}).get("win_rate"))
    if rate is None:
        return "-"
    low, high = finite(d.get("ci_low")), finite(d.get("ci_high"))
    ci = f" ({100 * low:.1f}-{100 * high:.1f})" if low is not None and high is not None else ""
    return f"{100 * rate:.1f}%{ci}"


def pass_cell(passed: dict | None, ev: dict | None = None) -> str:
    """The pass rate with its interval; a run from before pass rates shows its accuracy."""
    if not passed:
        return pct((ev or {}).get("accuracy"))
    rate, low, high = (finite(passed.get(k)) for k in ("pass_rate", "ci_low", "ci_high"))
    if rate is None:
        return "-"
    return f"{100 * rate:.1f}%" + (f" ({100 * low:.1f}-{100 * high:.1f})" if low is not None and high is not None else "")


def _errors_cell(counts: dict) -> str:
    """Training / eval judge errors, e.g. "2 / 0"."""
    return f"{counts['train']} / {'-' if counts['eval'] is None else counts['eval']}"


def _drift_cell(drift: dict | None) -> str:
    return "-" if drift is None else f"{drift['chosen']:+.1f}/{drift['rejected']:+.1f}"


def table_rows(rounds: list[RoundView]) -> list[list[str]]:
    """One list of cell strings per round, in COLUMNS order (shared by the terminal and HTML)."""
    rows = []
    for v in rounds:
        if not v.complete:
            rows.append([str(v.round), v.status, *["-"] * (len(COLUMNS) - 2)])
            continue
        ev, res = v.eval, v.result
        base = ev.get("vs_baseline")
        train = train_summary(v)
        cost, requests = judge_cost(v)
        cost_cell = "-" if cost is None and requests is None else f"${cost or 0:.4f} / {requests or 0} req"
        mean, p90 = mean_tokens(v), p90_tokens(v)
        pairs = res.get("pairs", (res.get("funnel") or {}).get("pairs"))
        if pairs is None and res.get("examples") is not None:  # KTO: unpaired examples
            pairs = f"{res['examples']} ex"
        rows.append([
            str(v.round), _with_ci(base), pct((base or {}).get("lc_win_rate")), pct((base or {}).get("tie_rate")),
            pct((base or {}).get("error_rate")), _with_ci(ev.get("vs_previous")), pass_cell(ev.get("pass"), ev),
            f"{_num(mean, '.1f')}/{_num(p90, '.0f')}" if mean is not None else "-",
            "-" if pairs is None else str(pairs), _num(train["loss"]), _num(train["reward_margin"]),
            pct(train["pair_accuracy"]), _num(train["kl"], ".4f"), _drift_cell(logp_drift(v)),
            pct(position_consistency(v)), cost_cell, _errors_cell(judge_error_counts(res)),
            _num(res.get("wall_s"), ".0f"), "; ".join(v.warnings) or "-",
        ])
    return rows


DIVERSITY_COLUMNS = ("round", "distinct-1", "distinct-2", "pairwise overlap", "token entropy", "samples")


def diversity_rows(rounds: list[RoundView], baseline: dict | None) -> list[list[str]]:
    """The diversity watch, one row per round with a measurement (the initial policy first):
    each value with its share of the initial policy's in brackets (the overlap as a multiple)."""
    def cells(label: str, d: dict) -> list[str]:
        out = [label]
        for key, fmt in (("distinct_1", ".3f"), ("distinct_2", ".3f"), ("pairwise_overlap", ".3f"), ("token_entropy", ".3f")):
            value, ref = finite(d.get(key)), finite((baseline or {}).get(key))
            share = ""
            if value is not None and ref and d is not baseline:
                # overlap grows as diversity falls, by several times: a multiple reads better than a percentage
                share = f" ({value / ref:.1f}x)" if key == "pairwise_overlap" else f" ({value / ref:.0%})"
            out.append(_num(value, fmt) + share)
        out.append(f"{d.get('prompts', '-')} x {d.get('samples_per_prompt', '-')}")
        return out

    rows = [cells("initial", baseline)] if baseline else []
    return rows + [cells(str(v.round), v.eval["diversity"]) for v in rounds if v.eval.get("diversity")]


JUDGE_COLUMNS = ("round", "comparisons", "ties", "errors", "consistency", "separated", "test at",
                 "right vs refs (95% CI)", "flip rate")


def judge_rows(rounds: list[RoundView]) -> list[list[str]]:
    """One row per round with a pairwise judge's quality (`online_dpo.judge_quality`), in JUDGE_COLUMNS."""
    rows = []
    for v in rounds:
        q = (v.result or {}).get("judge_quality")
        if not q:
            continue
        ref, level = q.get("vs_reference") or {}, q.get("separation_level")  # level: absent in earlier runs
        right = "-" if ref.get("accuracy") is None else \
            f"{pct(ref['accuracy'])} ({100 * ref['interval'][0]:.1f}-{100 * ref['interval'][1]:.1f}) of {ref['decisive']}"
        separated = f"{q['separated_prompts']}/{q['tested_prompts']}" if q.get("tested_prompts") else "-"
        tested_at = "-" if level is None else "off" if level >= 1.0 else f"{level:g}"
        rows.append([str(v.round), str(q["comparisons"]), pct(q.get("tie_rate")), str(q["errors"]),
                     pct(q.get("position_consistency")), separated, tested_at, right, _num(ref.get("flip_rate"), ".2f")])
    return rows
