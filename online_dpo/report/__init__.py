"""The report on a run directory, finished or not: `build_report` prints the per-round table and
writes plots/*.png, report.html and, when asked, tracker logs. Its parts: view (the data, no
rendering), terminal, plots, html, trackers, and inspect (one round in detail)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from online_dpo.report.terminal import print_run, report_console
from online_dpo.report.view import DEFAULT_LENGTH_FACTOR, load_run

__all__ = ["build_report"]


def build_report(root: str | Path, length_factor: float = DEFAULT_LENGTH_FACTOR, examples: int = 3,
                 console: Console | None = None, plots: bool = True, html: bool = True,
                 log_with: list | None = None, wide: bool = False) -> dict:
    """Print the table, write plots/*.png and report.html under `root`; returns what was written.

    `log_with`: accelerate trackers ("tensorboard", "wandb", or GeneralTracker instances) that
    also receive every finished round's numbers (logs under `root`/trackers); off by default.
    `wide`: the table with every column (judge, training, length and cost columns too).
    """
    run = load_run(root, length_factor)
    console = console or report_console(wide)
    print_run(run, title=f"online-dpo report: {run.name}", console=console, wide=wide)
    done = sum(v.complete for v in run.rounds)
    written: dict = {"rounds": len(run.rounds), "complete": done, "plots": {}}
    if plots:
        from online_dpo.report.plots import write_plots  # matplotlib: only when plotting

        written["plots"] = write_plots(run, run.dir, length_factor)
    if html:
        from online_dpo.report.html import write_html

        written["html"] = write_html(run, run.dir.report_html, written["plots"], examples)
    if log_with:
        from online_dpo.report.trackers import log_run

        written["tracked_rounds"] = log_run(run, log_with, run.dir.trackers_dir)
        console.print(f"logged {written['tracked_rounds']} rounds to {', '.join(map(str, log_with))}")
    for label, path in [*written["plots"].items(), ("report", written.get("html"))]:
        if path:
            console.print(f"{label}: {path}")
    return written
