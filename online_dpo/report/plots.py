"""The report's PNG plots, one figure per question: did the rounds win (with CI bands), did
responses grow, how did the DPO update go, what did each round cost; and the figure helpers
(`new_figure`, `save_png`: matplotlib's object API on the Agg canvas, no display and no global
pyplot state, so a report can run in a headless job or beside a running campaign)."""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from online_dpo.report.view import RunView, finite, judge_cost, mean_tokens, p90_tokens
from online_dpo.rundir import RunDir, atomic_path

BASELINE_COLOR, PREV_COLOR, LC_COLOR = "tab:blue", "tab:orange", "tab:green"


def new_figure(ncols: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(6.4 * ncols, 4.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def save_png(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
        tmp.chmod(0o644)  # a report is meant to be read by others (temp files start private)
    return path


def _series(run: RunView, key: str, field: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """(rounds, value, ci_low, ci_high) of eval[key][field] over complete rounds that have it."""
    xs, ys, lo, hi = [], [], [], []
    for v in run.rounds:
        d = v.eval.get(key) or {}
        y = finite(d.get(field))
        if y is None:
            continue
        xs.append(v.round)
        ys.append(y)
        lo.append(finite(d.get("ci_low")) if field == "win_rate" else None)
        hi.append(finite(d.get("ci_high")) if field == "win_rate" else None)
    return xs, ys, lo, hi


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes, color="gray")


def _round_axis(ax, run: RunView) -> None:
    ax.set_xlabel("round")
    ax.set_xticks(range(len(run.rounds)))
    ax.set_xlim(-0.5, max(len(run.rounds) - 0.5, 0.5))
    ax.grid(alpha=0.3)


def plot_win_rates(run: RunView, path: Path) -> Path:
    fig, (ax,) = new_figure()
    ax.axhline(0.5, color="gray", lw=1, ls=":")
    plotted = False
    for key, label, color in (("vs_baseline", "vs baseline (initial policy)", BASELINE_COLOR),
                              ("vs_previous", "vs previous round", PREV_COLOR)):
        xs, ys, lo, hi = _series(run, key, "win_rate")
        if not xs:
            continue
        plotted = True
        ax.plot(xs, ys, marker="o", color=color, label=label)
        if all(x is not None for x in lo + hi):
            ax.fill_between(xs, lo, hi, color=color, alpha=0.2, label=f"95% CI ({label})")
            # Error bars too: a band needs two rounds, a bar shows the interval of a single one.
            ax.errorbar(xs, ys, yerr=[[y - l for y, l in zip(ys, lo)], [h - y for y, h in zip(ys, hi)]],
                        fmt="none", ecolor=color, capsize=3, alpha=0.7)
    xs, ys, _, _ = _series(run, "vs_baseline", "lc_win_rate")
    if xs:
        ax.plot(xs, ys, marker="s", ls="--", color=LC_COLOR, label="length-controlled vs baseline")
    if not plotted:
        _no_data(ax, "no finished round yet")
    ax.set_ylim(0, 1)
    ax.set_ylabel("win rate (ties count half)")
    ax.set_title("Held-out win rate per round")
    _round_axis(ax, run)
    if plotted:
        ax.legend(loc="best", fontsize="small")
    return save_png(fig, path)


def plot_lengths(run: RunView, path: Path, length_factor: float) -> Path:
    fig, (ax,) = new_figure()
    done = [v for v in run.rounds if mean_tokens(v) is not None]
    if done:
        xs = [v.round for v in done]
        ax.plot(xs, [mean_tokens(v) for v in done], marker="o", label="mean")
        p90 = [(v.round, p90_tokens(v)) for v in done if p90_tokens(v) is not None]
        if p90:
            ax.plot(*zip(*p90), marker="^", ls="--", label="90th percentile")
        med = [(v.round, finite((v.eval.get("response_tokens") or {}).get("median"))) for v in done]
        med = [(x, y) for x, y in med if y is not None]
        if med:
            ax.plot(*zip(*med), marker="v", ls=":", label="median")
    else:
        _no_data(ax, "no finished round yet")
    if run.baseline_tokens:
        base = sum(run.baseline_tokens) / len(run.baseline_tokens)
        ax.axhline(base, color="gray", lw=1, label="baseline mean")
        ax.axhline(base * length_factor, color="red", lw=1, ls=":", label=f"warning above {length_factor:g}x")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("response tokens (held-out prompts)")
    ax.set_title("Response length per round")
    _round_axis(ax, run)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize="small")
    return save_png(fig, path)


def plot_margins(run: RunView, path: Path) -> Path:
    """DPO implicit reward margin and loss at every optimizer step, rounds side by side."""
    fig, (ax_margin, ax_loss) = new_figure(2)
    step0, bounds = 0, []
    for v in run.rounds:
        steps = v.train_steps
        if not steps:
            continue
        xs = [step0 + i for i in range(len(steps))]
        ax_margin.plot(xs, [s.get("reward_margin", math.nan) for s in steps], marker=".", label=f"round {v.round}")
        ax_loss.plot(xs, [s.get("loss", math.nan) for s in steps], marker=".", label=f"round {v.round}")
        step0 += len(steps)
        bounds.append(step0 - 0.5)
    for ax, title, ylabel in ((ax_margin, "DPO reward margin (chosen - rejected)", "beta * log-ratio margin"),
                              (ax_loss, "DPO loss", "loss")):
        for b in bounds[:-1]:
            ax.axvline(b, color="gray", lw=0.8, ls=":")
        ax.set_title(title)
        ax.set_xlabel("optimizer step (all rounds)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if step0:
            ax.legend(loc="best", fontsize="small")
        else:
            _no_data(ax, "no DPO update recorded yet")
    return save_png(fig, path)


def plot_costs(run: RunView, path: Path) -> Path:
    """Wall time per stage (stacked) and, for judges that report usage, API cost and requests."""
    fig, (ax_time, ax_judge) = new_figure(2)
    done = [v for v in run.rounds if v.complete and v.result.get("timings")]
    stages: list[str] = []
    for v in done:
        stages += [s for s in v.result["timings"] if s not in stages]
    bottom = [0.0] * len(done)
    for stage in stages:
        vals = [float(v.result["timings"].get(stage, 0.0)) for v in done]
        ax_time.bar([v.round for v in done], vals, bottom=bottom, label=stage)
        bottom = [b + x for b, x in zip(bottom, vals)]
    if not done:
        _no_data(ax_time, "no finished round yet")
    else:
        ax_time.legend(loc="best", fontsize="small")
    ax_time.set_title("Wall time per stage")
    ax_time.set_ylabel("seconds")
    _round_axis(ax_time, run)

    usage = [(v.round, *judge_cost(v)) for v in run.rounds if v.complete]
    usage = [(r, c, n) for r, c, n in usage if c is not None or n is not None]
    if usage:
        rounds = [u[0] for u in usage]
        ax_judge.bar(rounds, [u[2] or 0 for u in usage], color="tab:gray", label="requests sent")
        ax_judge.set_ylabel("judge requests")
        ax_cost = ax_judge.twinx()
        ax_cost.plot(rounds, [u[1] or 0.0 for u in usage], marker="o", color="tab:red", label="cost ($)")
        ax_cost.set_ylabel("judge cost ($)")
        ax_cost.set_ylim(bottom=0)
        ax_judge.legend(loc="upper left", fontsize="small")
        ax_cost.legend(loc="upper right", fontsize="small")
    else:
        _no_data(ax_judge, "the judge reported no usage\n(verifiers and local judges are free)")
    ax_judge.set_title("Judge requests and cost")
    _round_axis(ax_judge, run)
    return save_png(fig, path)


def write_plots(run: RunView, run_dir: RunDir, length_factor: float) -> dict[str, Path]:
    """Every plot as PNG under the run's plots/; returns {name: path}."""
    run_dir.plots_dir.mkdir(parents=True, exist_ok=True)
    return {
        "win_rate": plot_win_rates(run, run_dir.plot_png("win_rate")),
        "length": plot_lengths(run, run_dir.plot_png("length"), length_factor),
        "margins": plot_margins(run, run_dir.plot_png("margins")),
        "cost": plot_costs(run, run_dir.plot_png("cost")),
    }
