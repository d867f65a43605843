"""`online-dpo compare CONFIG`: one campaign under several sync schedules at the same budget,
then their final policies judged head to head on the held-out prompts.

All schedules get the same train prompts, the same judge calls (prompts x K candidates) and
the same number of optimizer steps:
- offline: one round; every candidate comes from the initial policy;
- iterative: the config's R rounds, exactly as `online-dpo run` runs them;
- semi-online: the generator (and the refreshed reference) synced every s optimizer steps of
  one continuous run: the AdamW moments and the LR schedule carry across syncs.
Each schedule is a normal run directory under runs/<name>-compare/, resumable like any other;
running `compare` again continues the unfinished ones and redoes the comparison.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from online_dpo.config import CampaignConfig, ConfigError, judge_options
from online_dpo.rundir import RunDir

log = logging.getLogger("online_dpo")
SCHEDULES = ("offline", "iterative", "semi-online")


@dataclass(frozen=True)
class Schedule:
    """How one schedule spends the shared budget."""

    name: str
    rounds: int  # generator syncs + 1
    prompts_per_round: int
    steps_per_round: int
    continuous: bool  # the optimizer state and LR schedule carry across rounds

    def overrides(self) -> list[str]:
        out = [f"rounds={self.rounds}", f"data.train_prompts_per_round={self.prompts_per_round}",
               f"dpo.max_steps={self.steps_per_round}"]
        if self.continuous and self.rounds > 1:
            out += ["dpo.optimizer_state=carry", "dpo.lr_schedule_span=campaign"]
        return out


@dataclass(frozen=True)
class Budget:
    prompts: int
    judge_calls: int  # candidates judged: prompts x K
    steps: int


def steps_per_round(cfg: CampaignConfig) -> int:
    """The config's optimizer steps per round: dpo.max_steps, or else what `epochs` passes take
    when every prompt of the round forms one pair (best_vs_worst's most)."""
    if cfg.dpo.max_steps > 0:
        return cfg.dpo.max_steps
    batches = math.ceil(cfg.data.train_prompts_per_round / cfg.dpo.batch_size)
    return cfg.dpo.epochs * math.ceil(batches / cfg.dpo.grad_accum_steps)


def plan(cfg: CampaignConfig, names: list[str], sync_every: int | None = None) -> tuple[Budget, list[Schedule]]:
    """The shared budget of `cfg` and the schedules that spend it. semi-online syncs every
    `sync_every` steps (default: twice per iterative round)."""
    unknown = [n for n in names if n not in SCHEDULES]
    if unknown:
        raise ConfigError(f"unknown schedule {unknown[0]!r}; available: {', '.join(SCHEDULES)}")
    if not cfg.eval.enabled:
        raise ConfigError("compare reads each schedule's held-out eval; remove eval.enabled=false")
    per_round = steps_per_round(cfg)
    prompts = cfg.rounds * cfg.data.train_prompts_per_round
    budget = Budget(prompts, prompts * cfg.generation.samples_per_prompt, cfg.rounds * per_round)
    schedules = []
    for name in names:
        if name == "offline":
            schedules.append(Schedule("offline", 1, prompts, budget.steps, continuous=False))
        elif name == "iterative":
            schedules.append(Schedule("iterative", cfg.rounds, cfg.data.train_prompts_per_round, per_round, False))
        else:
            s = sync_every or max(1, per_round // 2)
            syncs = budget.steps // s
            if s < 1 or budget.steps % s or prompts % syncs:
                valid = [v for v in range(1, budget.steps + 1) if budget.steps % v == 0 and prompts % (budget.steps // v) == 0]
                raise ConfigError(
                    f"semi-online: a sync every {s} steps does not split {budget.steps} steps and {prompts} prompts "
                    f"into equal segments; --sync-every must be one of {valid}")
            schedules.append(Schedule(f"semi-online-s{s}", syncs, prompts // syncs, s, continuous=True))
    return budget, schedules


def schedule_dir(cfg: CampaignConfig, schedule: Schedule) -> Path:
    return Path(cfg.output_dir) / f"{cfg.name}-compare" / schedule.name


def run_schedule(config_path: str, overrides: list[str], cfg: CampaignConfig, schedule: Schedule) -> Path:
    """Run (or resume) one schedule's campaign in its own process (vLLM keeps process-wide state)."""
    root = schedule_dir(cfg, schedule)
    place = [f"output_dir={root.parent}", f"name={root.name}"]
    run = RunDir(root)
    if run.manifest_path.exists():
        if run.summary_json.exists():
            log.info("%s: finished earlier (%s)", schedule.name, root)
            return root
        command = ["resume", str(root)]
    else:
        command = ["run", config_path, *overrides, *schedule.overrides(), *place]
    log.info("%s: online-dpo %s", schedule.name, " ".join(command))
    proc = subprocess.run([sys.executable, "-m", "online_dpo.cli", *command])
    if proc.returncode != 0:
        raise RuntimeError(f"schedule {schedule.name} stopped with exit code {proc.returncode}; fix the cause and run "
                           f"`online-dpo compare` again (it resumes {root})")
    return root


# --- reading the runs back -------------------------------------------------------------

def spent(root: Path) -> dict:
    """What a finished run spent, read from its files: prompts, judge calls, optimizer steps, per round."""
    from online_dpo.rundir import read_jsonl

    run, rounds = RunDir(root), []
    for paths in map(run.round_paths, run.rounds_on_disk()):
        funnel = json.loads(paths.funnel.read_text())
        rounds.append({"prompts": funnel["prompts"], "judge_calls": funnel["judged"],
                       "steps": len(read_jsonl(paths.train_metrics)) if paths.train_metrics.exists() else 0})
    total = {k: sum(r[k] for r in rounds) for k in ("prompts", "judge_calls", "steps")}
    return {**total, "rounds": rounds}


def final_responses(root: Path) -> dict[str, str]:
    from online_dpo.rundir import read_jsonl

    run = RunDir(root)
    last = run.round_paths(run.rounds_on_disk()[-1])
    return {row["prompt_id"]: row["text"] for row in read_jsonl(last.eval_responses)}


def paired_difference_interval(a: list[float], b: list[float], seed: int = 0, n_boot: int = 4000) -> tuple[float, float]:
    """95% percentile-bootstrap interval of mean(a) - mean(b), resampling prompts (a, b paired: shape [n])."""
    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(n_boot, diff.size))].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def head_to_head(judge, prompts, responses: dict[str, list[str]]) -> list[dict]:
    """Every pair of schedules judged on the held-out prompts: A's win rate over B (ties half,
    errors apart, Wilson 95% CI), and A's accuracy minus B's with a paired bootstrap CI.
    A is the later of the two in `responses` (schedules go from offline to more online)."""
    from online_dpo import evaluate

    out = []
    for b, a in itertools.combinations(responses, 2):
        verdicts = evaluate.compare(judge, prompts, responses[a], responses[b])
        row = {"a": a, "b": b, **evaluate.win_rate(verdicts)}
        ca, cb = evaluate.correctness(prompts, responses[a]), evaluate.correctness(prompts, responses[b])
        if ca is not None:
            row["accuracy_difference"] = sum(ca) / len(ca) - sum(cb) / len(cb)
            row["accuracy_difference_ci"] = paired_difference_interval(ca, cb)
        out.append(row)
    return out


def accuracy_row(prompts, texts: list[str]) -> dict | None:
    from online_dpo.evaluate import correctness, wilson_interval

    c = correctness(prompts, texts)
    if c is None:
        return None
    low, high = wilson_interval(sum(c), len(c))
    return {"accuracy": sum(c) / len(c), "ci_low": low, "ci_high": high, "n": len(c)}


def curve(root: Path) -> list[dict]:
    """(judge calls spent, accuracy, win rate vs initial with CI) after each round; the initial policy at 0."""
    run = RunDir(root)
    points = [{"judge_calls": 0, "accuracy": run.manifest["rounds"]["baseline"]["eval"]["accuracy"], "win_rate": 0.5}]
    calls = 0
    for r in run.rounds_on_disk():
        result = json.loads(run.round_paths(r).eval_json.read_text())
        calls += result["funnel"]["judged"]
        ev = result["eval"]
        points.append({"judge_calls": calls, "accuracy": ev["accuracy"], "win_rate": ev["vs_baseline"]["win_rate"],
                       "ci_low": ev["vs_baseline"]["ci_low"], "ci_high": ev["vs_baseline"]["ci_high"]})
    return points


# --- the command -----------------------------------------------------------------------

def compare(config_path: str, overrides: list[str], names: list[str], sync_every: int | None = None) -> dict:
    """Run every schedule (resuming any unfinished), check the budgets match, judge the final
    policies head to head, and write compare.json, compare.png and the printed table."""
    from judges import as_pairwise, load_judge
    from judges.models import resolve_model_path
    from online_dpo.config import load_config
    from online_dpo.data import load_prompts
    from online_dpo.engines.models import load_tokenizer
    from online_dpo.rundir import write_json

    cfg = load_config(config_path, overrides)
    budget, schedules = plan(cfg, names, sync_every)
    if cfg.dpo.max_steps <= 0:
        log.info("dpo.max_steps is not set: every round of every schedule trains a fixed %d steps here "
                 "(epochs x batches of a round whose every prompt forms a pair), so the budgets can match",
                 budget.steps // cfg.rounds)
    log.info("budget of every schedule: %d train prompts, %d judge calls, %d optimizer steps",
             budget.prompts, budget.judge_calls, budget.steps)
    roots = {s.name: run_schedule(config_path, overrides, cfg, s) for s in schedules}

    spending = {name: spent(root) for name, root in roots.items()}
    matched = all((v["prompts"], v["judge_calls"], v["steps"]) == (budget.prompts, budget.judge_calls, budget.steps)
                  for v in spending.values())
    tokenizer = load_tokenizer(resolve_model_path(cfg.policy.model))
    prompts = load_prompts(cfg.data, tokenizer, cfg.policy.max_prompt_tokens).eval
    responses = {}
    for name, root in roots.items():
        by_id = final_responses(root)
        responses[name] = [by_id[p.id] for p in prompts]
    judge = as_pairwise(load_judge(cfg.judge.name, **judge_options(cfg.judge)))
    baseline = {row_id: text for row_id, text in _baseline(roots)}
    result = {
        "budget": asdict(budget), "matched": matched, "spent": spending,
        "schedules": {s.name: {**asdict(s), "run_dir": str(roots[s.name]),
                               "final": accuracy_row(prompts, responses[s.name]), "curve": curve(roots[s.name])}
                      for s in schedules},
        "initial": accuracy_row(prompts, [baseline[p.id] for p in prompts]),
        "head_to_head": head_to_head(judge, prompts, responses),
    }
    out_dir = schedule_dir(cfg, schedules[0]).parent
    write_json(out_dir / "compare.json", result)
    plot_curves(result, out_dir / "compare.png")
    print_comparison(result)
    if not matched:
        log.warning("the schedules did not spend the same budget (see 'spent' in %s): a round without pairs "
                    "trains no steps; read the comparison with that in mind", out_dir / "compare.json")
    return result


def _baseline(roots: dict[str, Path]):
    """The initial policy's held-out responses (the same in every schedule: same seed, same model)."""
    from online_dpo.rundir import read_jsonl

    first = RunDir(next(iter(roots.values())))
    return [(row["prompt_id"], row["text"]) for row in read_jsonl(first.baseline.eval_responses)]


def _pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def print_comparison(result: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=160)
    b = result["budget"]
    budget = Table(title=f"budget: {b['prompts']} prompts, {b['judge_calls']} judge calls, {b['steps']} optimizer steps"
                         f" ({'matched' if result['matched'] else 'NOT matched'})")
    for col in ("schedule", "rounds", "prompts", "judge calls", "steps", "final accuracy (95% CI)"):
        budget.add_column(col, justify="right")
    if result.get("initial"):
        i = result["initial"]
        budget.add_row("initial policy", "-", "-", "-", "-", f"{_pct(i['accuracy'])} ({_pct(i['ci_low'])}-{_pct(i['ci_high'])})")
    for name, s in result["schedules"].items():
        spent, final = result["spent"][name], s["final"]
        acc = f"{_pct(final['accuracy'])} ({_pct(final['ci_low'])}-{_pct(final['ci_high'])})" if final else "-"
        budget.add_row(name, str(s["rounds"]), str(spent["prompts"]), str(spent["judge_calls"]), str(spent["steps"]), acc)
    console.print(budget)
    h2h = Table(title="head to head on the held-out prompts (A vs B, ties half, judge errors apart)")
    for col in ("A", "B", "A's win rate (95% CI)", "wins/losses/ties/errors", "accuracy A - B (95% CI)"):
        h2h.add_column(col, justify="right")
    for row in result["head_to_head"]:
        diff = row.get("accuracy_difference")
        ci = row.get("accuracy_difference_ci")
        h2h.add_row(row["a"], row["b"], f"{_pct(row['win_rate'])} ({_pct(row['ci_low'])}-{_pct(row['ci_high'])})",
                    f"{row['wins']}/{row['losses']}/{row['ties']}/{row['errors']}",
                    "-" if diff is None else f"{100 * diff:+.1f} ({100 * ci[0]:+.1f} to {100 * ci[1]:+.1f})")
    console.print(h2h)


def plot_curves(result: dict, path: Path) -> Path:
    """Accuracy and win rate vs the initial policy against judge calls spent, one line per schedule."""
    from online_dpo.report.plots import new_figure, save_png

    fig, (acc_ax, win_ax) = new_figure(ncols=2)
    for name, s in result["schedules"].items():
        pts = s["curve"]
        xs = [p["judge_calls"] for p in pts]
        if all(p["accuracy"] is not None for p in pts):
            acc_ax.plot(xs, [100 * p["accuracy"] for p in pts], marker="o", label=name)
        line = win_ax.plot(xs, [100 * p["win_rate"] for p in pts], marker="o", label=name)[0]
        lo = [100 * p.get("ci_low", p["win_rate"]) for p in pts]
        hi = [100 * p.get("ci_high", p["win_rate"]) for p in pts]
        win_ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
    acc_ax.set(xlabel="judge calls spent", ylabel="held-out accuracy (%)", title="accuracy")
    win_ax.set(xlabel="judge calls spent", ylabel="win rate vs initial policy (%)", title="win rate (95% CI)")
    win_ax.axhline(50, color="gray", lw=0.8, ls="--")
    for ax in (acc_ax, win_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    return save_png(fig, path)
