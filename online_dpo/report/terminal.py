"""The report in the terminal (rich): the per-round table, the best policy, the diversity
table, the judge-quality table. `print_run` is the one printer: the campaign calls it after each round (through
`print_rounds`, on the rounds it holds) and `online-dpo report` on a run read from disk.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from online_dpo.report.tables import (
    COLUMNS,
    DIVERSITY_COLUMNS,
    SUMMARY_COLUMNS,
    JUDGE_COLUMNS,
    diversity_rows,
    judge_rows,
    pass_cell,
    pct,
    summary_rows,
    table_rows,
)
from online_dpo.report.timing import stage_shares
from online_dpo.report.view import (
    BestPolicy,
    RoundView,
    RunView,
    best_policy,
    run_from_results,
)

CAMPAIGN_TITLE = "online-dpo: held-out evaluation per round (vs the initial policy = baseline)"


def round_table(views: list[RoundView], title: str | None = None, wide: bool = False) -> Table:
    """The per-round table of `views` (their warnings already attached): the summary columns,
    or every column with `wide`."""
    table = Table(title=title or CAMPAIGN_TITLE)
    for col in COLUMNS if wide else SUMMARY_COLUMNS:
        table.add_column(col, justify="left" if col == "warnings" and wide else "right",
                         style="bold red" if col == "warnings" else None, overflow="fold")
    for view, cells in zip(views, table_rows(views) if wide else summary_rows(views)):
        style = "dim" if not view.complete else ("red" if view.warnings else None)
        table.add_row(*[Text(c) for c in cells], style=style)
    return table


def side_table(title: str, columns: tuple[str, ...], rows: list[list[str]]) -> Table | None:
    """A small right-aligned table beside the per-round one (None without rows)."""
    if not rows:
        return None
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="right")
    for cells in rows:
        table.add_row(*cells)
    return table


def diversity_table(rounds: list[RoundView], baseline: dict | None) -> Table | None:
    return side_table("diversity of K samples per held-out prompt (share of the initial policy's); "
                      "overlap: lower is more diverse; entropy in nats/token", DIVERSITY_COLUMNS,
                      diversity_rows(rounds, baseline))


def judge_table(rounds: list[RoundView]) -> Table | None:
    return side_table("the judge's quality, from each round's round robins (pairwise judges); right vs references: "
                      "where one candidate is right and the other wrong, ties counted half", JUDGE_COLUMNS,
                      judge_rows(rounds))


def best_line(best: BestPolicy) -> str:
    note = f"; rejected by the round guard: {', '.join(map(str, best.rejected))}" if best.rejected else ""
    if best.round is None:
        return f"best policy: the initial one (no accepted round does better){note}"
    passed = f"pass rate {pct(best.pass_rate)}; " if best.pass_rate is not None else ""
    return (f"best policy: round {best.round} ({passed}win rate vs the initial policy {pct(best.win_rate)}; "
            f"runs/.../best){note}")


def report_console(wide: bool = False) -> Console:
    # Logs and CI are not terminals (rich would fold the tables to 80 columns there): 120 columns
    # hold the summary tables at their natural width, 220 the wide one. A real terminal keeps its
    # own width (rich folds the cells to fit).
    console = Console()
    return console if console.is_terminal else Console(width=220 if wide else 120)


def print_run(run: RunView, title: str | None = None, console: Console | None = None, wide: bool = False) -> None:
    """The baseline's accuracy, the per-round table (every column with `wide`) and its warnings,
    the best policy, the diversity and judge tables, and how many rounds are finished when some are not."""
    console = console or report_console(wide)
    if run.baseline_pass:
        console.print(f"baseline (initial policy) pass rate on held-out prompts, by {run.baseline_pass['scorer']}: "
                      f"{pass_cell(run.baseline_pass)}")
    elif run.baseline_accuracy is not None:
        console.print(f"baseline (initial policy) accuracy on held-out prompts: {pct(run.baseline_accuracy)}")
    console.print(round_table(run.rounds, title=title, wide=wide))
    if not wide:
        for view in run.rounds:
            for warning in view.warnings:
                console.print(Text(f"round {view.round}: {warning}", style="red"))
    console.print(best_line(best_policy(run.results)))
    div = diversity_table(run.rounds, run.baseline_diversity)
    if div is not None:
        console.print(div)
    judged = judge_table(run.rounds)
    if judged is not None:
        console.print(judged)
    done = sum(v.complete for v in run.rounds)
    if done < len(run.rounds):
        console.print(f"[yellow]{done} of {len(run.rounds)} rounds finished; the others are shown as incomplete[/]")


def print_rounds(results: list[dict], baseline_accuracy: float | None = None, console: Console | None = None,
                 baseline_diversity: dict | None = None, baseline_pass: dict | None = None) -> None:
    """The campaign's table after each round, from the eval.json dicts of its rounds so far."""
    print_run(run_from_results(results, baseline_accuracy, baseline_diversity, baseline_pass), console=console)


def print_stage_shares(seconds: dict[str, float], wall_s: float, console: Console | None = None) -> None:
    """Where this run's wall time went: one line per stage with its seconds and share."""
    console = console or report_console()
    console.print(f"where the time went ({wall_s:.0f} s in all, this run):")
    for name, spent, share in stage_shares(seconds, wall_s):
        console.print(f"  {name:<14}{spent:8.1f} s {100 * share:5.1f}%", highlight=False)
