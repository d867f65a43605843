"""Per-round results for people: the terminal table printed after each round."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def round_table(rows: list[dict]) -> Table:
    """`rows`: one dict per round with keys round, eval (evaluate_round output), pairs, wall_s."""
    table = Table(title="online-dpo: held-out evaluation per round (policy vs round-0 policy)")
    for col in ("round", "win rate", "95% CI", "ties", "errors", "vs prev", "accuracy", "resp len", "pairs", "wall s"):
        table.add_column(col, justify="right")
    for row in rows:
        ev = row["eval"]
        base = ev["vs_baseline"]
        prev = ev.get("vs_previous")
        table.add_row(
            str(row["round"]), _pct(base["win_rate"]), f"{_pct(base['ci_low'])}-{_pct(base['ci_high'])}",
            _pct(base["tie_rate"]), _pct(base["error_rate"]), _pct(prev["win_rate"]) if prev else "-",
            _pct(ev["accuracy"]), f"{ev['mean_response_tokens']:.1f}", str(row.get("pairs", "-")),
            f"{row.get('wall_s', 0):.0f}",
        )
    return table


def print_rounds(rows: list[dict], baseline_accuracy: float | None = None, console: Console | None = None) -> None:
    # Logs and CI are not terminals (rich would fold the table to 80 columns there).
    console = console or Console(width=max(Console().width, 120))
    if baseline_accuracy is not None:
        console.print(f"round-0 policy accuracy on held-out prompts: {_pct(baseline_accuracy)}")
    console.print(round_table(rows))
