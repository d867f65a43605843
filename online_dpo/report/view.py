"""What the report knows about a run, with no rendering: the rounds read from a run directory
(RunView, RoundView, load_run), their numbers, the reward-hacking warnings and the best
round. The table cells every renderer shares: `report.tables`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from online_dpo.errors import ReportError
from online_dpo.rundir import RunDir

DEFAULT_LENGTH_FACTOR = 1.5
log = logging.getLogger("online_dpo")


# --- reading a run directory ------------------------------------------------------------

@dataclass
class RoundView:
    """What the report knows about one round; `result` is the round's eval.json (None while incomplete)."""

    round: int
    result: dict | None = None
    stages: list[str] = field(default_factory=list)  # stages marked done in the manifest
    train_steps: list[dict] = field(default_factory=list)  # train_metrics.jsonl
    response_tokens: list[int] = field(default_factory=list)  # eval_responses.jsonl token counts
    warnings: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.result is not None

    @property
    def eval(self) -> dict:
        return (self.result or {}).get("eval") or {}

    @property
    def status(self) -> str:
        if self.complete:
            return "done"
        if "eval" in self.stages:
            return "eval.json unreadable"
        return f"incomplete (done: {self.stages[-1]})" if self.stages else "not started"


@dataclass
class RunView:
    """A run's rounds; `dir` is None for the rounds a running campaign holds in memory."""

    dir: RunDir | None
    name: str
    rounds: list[RoundView]
    baseline_accuracy: float | None = None
    baseline_tokens: list[int] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    baseline_diversity: dict | None = None  # the initial policy's (manifest: baseline/diversity)
    baseline_pass: dict | None = None  # the initial policy's pass rate (manifest: baseline/pass)

    @property
    def root(self) -> Path | None:
        return self.dir.root if self.dir else None

    @property
    def results(self) -> list[dict]:
        """The eval.json of every complete round."""
        return [v.result for v in self.rounds if v.complete]

    @property
    def best(self) -> BestPolicy:
        """The best policy so far: the round `runs/<name>/best` points to (None: the initial one)."""
        return best_policy(self.results)


def read_json_or_none(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None  # missing, or being written by a campaign that was killed mid-write


def read_jsonl_tolerant(path: Path) -> list[dict]:
    """The rows of a JSONL file ([] where it does not exist yet), each line that is not a JSON
    object skipped with a log line naming the file and line number, so that one bad line never
    hides the rows after it. A last line without its newline is a writer killed mid-append, the
    expected damage after a crash, and is logged at INFO; a bad line anywhere else is a warning.
    """
    if not path.exists():
        return []
    # Bytes, split on the writer's own "\n": a line torn inside a multi-byte character then
    # fails alone instead of failing the decoding of the whole file.
    lines = path.read_bytes().split(b"\n")
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:  # not JSON, or not UTF-8
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif n == len(lines):
            log.info("%s:%d: skipped an incomplete last line", path, n)
        else:
            log.warning("%s:%d: skipped a line that is not a JSON object; the lines after it are still read",
                        path, n)
    return rows


def open_run_dir(root: str | Path) -> RunDir | None:
    """The RunDir of `root` as it stands; None when it holds no readable manifest.json."""
    try:
        run_dir = RunDir(Path(root))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return run_dir if run_dir.manifest_path.exists() else None


def round_from_result(result: dict) -> RoundView:
    """A RoundView from an eval.json dict alone (what the campaign holds while it runs)."""
    return RoundView(int(result["round"]), result=result)


def run_from_results(results: list[dict], baseline_accuracy: float | None = None,
                     baseline_diversity: dict | None = None, baseline_pass: dict | None = None) -> RunView:
    """The rounds a running campaign holds (eval.json dicts), with the warnings they support."""
    run = RunView(None, "", [round_from_result(r) for r in results], baseline_accuracy,
                  baseline_diversity=baseline_diversity, baseline_pass=baseline_pass)
    add_warnings(run.rounds)
    return run


def load_run(root: str | Path, length_factor: float = DEFAULT_LENGTH_FACTOR) -> RunView:
    """Read every round of `root`, finished or not, and attach the warnings."""
    root = Path(root)
    run_dir = open_run_dir(root)
    if run_dir is None:
        raise ReportError(f"{root} is not a run directory (no readable manifest.json); "
                          f"pass runs/<name> of a campaign started with `online-dpo run CONFIG`")
    try:
        config = yaml.safe_load(run_dir.config_path.read_text()) or {}
    except (FileNotFoundError, yaml.YAMLError):
        config = {}
    marked = run_dir.manifest.get("rounds", {})
    stages = {k: list(v) for k, v in marked.items()}
    numbered = [int(k) for k in stages if k.isdigit()]
    count = max([config.get("rounds", 0), *(r + 1 for r in run_dir.rounds_on_disk() + numbered)])
    rounds = []
    for r in range(count):
        paths = run_dir.round_paths(r)
        rounds.append(RoundView(r, result=read_json_or_none(paths.eval_json), stages=stages.get(str(r), []),
                                train_steps=read_jsonl_tolerant(paths.train_metrics),
                                response_tokens=[row.get("tokens") for row in read_jsonl_tolerant(paths.eval_responses)
                                                 if row.get("tokens") is not None]))
    base = marked.get("baseline", {})
    run = RunView(run_dir, config.get("name", root.name), rounds, base.get("eval", {}).get("accuracy"),
                  [row["tokens"] for row in read_jsonl_tolerant(run_dir.baseline.eval_responses) if "tokens" in row],
                  config, base.get("diversity", {}).get("metrics"), base.get("pass", {}).get("result"))
    add_warnings(run.rounds, length_factor, run.baseline_tokens)
    return run


# --- per-round numbers (None when not recorded) ------------------------------------------

def finite(x) -> float | None:
    return None if x is None or not isinstance(x, (int, float)) or math.isnan(x) else float(x)


def judge_error_counts(result: dict) -> dict:
    """A round's judge errors from its record: in training (a pairwise judge's comparisons, or a
    scorer's candidates) and in the held-out eval (its comparisons against both policies and its
    answers scored for the pass rate; None without an eval)."""
    quality, held_out = result.get("judge_quality"), result.get("eval")
    train = quality["errors"] if quality else (result.get("funnel") or {}).get("judge_errors", 0)
    evals = None if held_out is None else sum((held_out.get(k) or {}).get("errors", 0)
                                              for k in ("vs_baseline", "vs_previous", "pass"))
    return {"train": train, "eval": evals}


def mean_tokens(view: RoundView) -> float | None:
    stats = view.eval.get("response_tokens") or {}
    return finite(stats.get("mean", view.eval.get("mean_response_tokens")))  # the latter: eval.json of earlier versions


def p90_tokens(view: RoundView) -> float | None:
    p90 = finite((view.eval.get("response_tokens") or {}).get("p90"))
    if p90 is None and view.response_tokens:
        import numpy as np

        p90 = float(np.quantile(view.response_tokens, 0.9))
    return p90


def length_ratio(view: RoundView, baseline_tokens: list[int] | None = None) -> float | None:
    """Mean response length of the round over the baseline's: tokens where the baseline's
    token counts are known, else characters of the judged pairs (recorded in eval.json)."""
    mean = mean_tokens(view)
    if baseline_tokens and mean is not None:
        base = sum(baseline_tokens) / len(baseline_tokens)
        return mean / base if base > 0 else None
    items = (view.eval.get("comparisons") or {}).get("vs_baseline") or []
    a, b = sum(i.get("chars_a", 0) for i in items), sum(i.get("chars_b", 0) for i in items)
    return a / b if items and b > 0 else None


def train_summary(view: RoundView) -> dict:
    """The round's DPO update at its last optimizer step: loss, reward margin, pair accuracy
    and KL (where the update recorded one). From train_metrics.jsonl, else eval.json's "train"."""
    if view.train_steps:
        last = view.train_steps[-1]
        kl_key = next((k for k in ("kl", "kl_estimate") if k in last), None)
        return {"loss": finite(last.get("loss")), "reward_margin": finite(last.get("reward_margin")),
                "pair_accuracy": finite(last.get("pair_accuracy")), "kl": finite(last.get(kl_key)) if kl_key else None,
                "steps": len(view.train_steps)}
    t = (view.result or {}).get("train") or {}
    return {"loss": finite(t.get("final_loss")), "reward_margin": finite(t.get("final_reward_margin")),
            "pair_accuracy": finite(t.get("final_pair_accuracy")), "kl": finite(t.get("final_kl")),
            "steps": t.get("steps")}


def logp_drift(view: RoundView) -> dict | None:
    """{chosen, rejected}: how the round's update moved the trained responses' mean log-prob (nats)."""
    drift = ((view.result or {}).get("train") or {}).get("logp_drift")
    return drift if drift and finite(drift.get("chosen")) is not None else None


def judge_cost(view: RoundView) -> tuple[float | None, int | None]:
    """(API cost, requests sent) of the round's judge, where the judge reports usage."""
    stats = (view.result or {}).get("judge_stats")
    if not stats:
        return None, None
    return finite(stats.get("cost")), stats.get("requests")


def position_consistency(view: RoundView) -> float | None:
    stats = (view.result or {}).get("judge_stats") or {}
    value = finite(stats.get("position_consistency"))
    return value if value is not None else finite((view.eval.get("vs_baseline") or {}).get("position_consistency"))


# --- warnings -------------------------------------------------------------------------

def add_warnings(rounds: list[RoundView], length_factor: float = DEFAULT_LENGTH_FACTOR,
                 baseline_tokens: list[int] | None = None) -> None:
    """Flag rounds that look like reward hacking (in place, on `view.warnings`).

    - longer but not better: mean response length grew more than `length_factor` x the
      baseline's while the length-controlled win rate vs the baseline is not above 50%;
    - worse than the previous round: win rate vs round r-1 below 50% by more than its CI
      (the whole interval lies under 0.5);
    - diversity collapsing: the round's eval recorded a diversity measure below
      eval.diversity_warn_fraction of the initial policy's (`diversity.collapse_warnings`);
    - likelihood displacement: the update lowered the mean log-likelihood of the chosen
      responses it trained on (`dpo.logp_drift`);
    - a judge no better than chance (`online_dpo.judge_quality.quality_warnings`).
    """
    for view in rounds:
        view.warnings = []
        if not view.complete:
            continue
        ratio = length_ratio(view, baseline_tokens)
        lc = finite((view.eval.get("vs_baseline") or {}).get("lc_win_rate"))
        if ratio is not None and ratio > length_factor and lc is not None and lc <= 0.5:
            view.warnings.append(f"responses {ratio:.2f}x the baseline's length (limit {length_factor:g}x) "
                                 f"but LC win rate {100 * lc:.1f}% is not above 50%")
        prev = view.eval.get("vs_previous") or {}
        high = finite(prev.get("ci_high"))
        if high is not None and high < 0.5:
            view.warnings.append(f"worse than round {view.round - 1}: win rate vs previous "
                                 f"{100 * prev['win_rate']:.1f}% (95% CI up to {100 * high:.1f}%) is below 50%")
        view.warnings += view.eval.get("diversity_warnings") or []
        view.warnings += ((view.result or {}).get("judge_quality") or {}).get("warnings") or []
        guard = (view.result or {}).get("guard") or {}
        if not guard.get("accepted", True):
            view.warnings.append(f"rejected by the round guard and rolled back: {guard.get('reason')}")
        drift = logp_drift(view)
        if drift is not None and drift["chosen"] < 0:
            view.warnings.append(
                f"chosen responses' likelihood fell: the update moved their log-prob by {drift['chosen']:+.2f} nats "
                f"(rejected {drift['rejected']:+.2f}); dpo.rpo_alpha > 0 anchors the chosen responses")


# --- the best round (the round guard's rule: campaign.guard_verdict) ----------------------

def best_round(results: list[dict]) -> int | None:
    """The accepted round whose held-out pass rate is highest (the later of equals), where the
    rounds have one, and above the initial policy's; else the one whose policy beat the initial
    one by the most, at a win rate of 50% or more. None: the initial policy is the best. Without
    evals: the last accepted round."""
    kept = [res for res in results if res and res.get("guard", {}).get("accepted", True)]
    passing = [(rate, res["round"], finite(res["eval"]["pass"].get("baseline_pass_rate"))) for res in kept
               if (rate := finite(((res.get("eval") or {}).get("pass") or {}).get("pass_rate"))) is not None]
    if passing:
        rate, r, initial = max(passing)
        return r if initial is None or rate > initial else None
    scored = [(w, res["round"]) for res in kept
              if (w := finite(((res.get("eval") or {}).get("vs_baseline") or {}).get("win_rate"))) is not None]
    if not scored:  # a round evaluated without a win rate is never the best one
        unevaluated = [res for res in kept if not res.get("eval")]
        return unevaluated[-1]["round"] if unevaluated and len(unevaluated) == len(kept) else None
    win, r = max(scored)
    return r if win >= 0.5 else None


@dataclass
class BestPolicy:
    """The best policy of a run: `round` None is the initial one; `win_rate` its win rate vs the
    initial policy and `pass_rate` its held-out pass rate (None where not measured); `rejected`
    the rounds the round guard rejected."""

    round: int | None
    win_rate: float | None
    rejected: list[int]
    pass_rate: float | None = None


def best_policy(results: list[dict]) -> BestPolicy:
    best = best_round(results)
    rejected = [res["round"] for res in results if res and not res.get("guard", {}).get("accepted", True)]
    if best is None:
        return BestPolicy(None, None, rejected)
    ev = next(res for res in results if res and res["round"] == best).get("eval") or {}
    return BestPolicy(best, (ev.get("vs_baseline") or {}).get("win_rate"), rejected,
                      finite((ev.get("pass") or {}).get("pass_rate")))
