"""The report to experiment trackers (TensorBoard, Weights & Biases, ...) through accelerate's
tracker API, off by default: `online-dpo report runs/<name> --log-with tensorboard` logs every
finished round's numbers (step = round) and the run's config as hyperparameters."""

from __future__ import annotations

from pathlib import Path

from online_dpo.report.view import ReportError, RoundView, RunView, finite, judge_cost, mean_tokens, train_summary


def round_metrics(view: RoundView) -> dict[str, float]:
    """The round's numbers as flat `group/name` scalars; what the round did not record is left out."""
    ev = view.eval
    values: dict[str, float | None] = {}
    for key in ("vs_baseline", "vs_previous"):
        d = ev.get(key) or {}
        for name in ("win_rate", "ci_low", "ci_high", "lc_win_rate", "tie_rate", "error_rate"):
            values[f"{key}/{name}"] = d.get(name)
    values["eval/accuracy"] = ev.get("accuracy")
    values["eval/mean_response_tokens"] = mean_tokens(view)
    values["pairs/count"] = (view.result or {}).get("pairs")
    values["examples/count"] = (view.result or {}).get("examples")  # dpo.loss=kto
    for name, value in (ev.get("diversity") or {}).items():
        if name not in ("prompts", "samples_per_prompt"):
            values[f"diversity/{name}"] = value
    for name, value in train_summary(view).items():
        if name != "steps":
            values[f"train/{name}"] = value
    cost, requests = judge_cost(view)
    values["judge/cost"], values["judge/requests"] = cost, requests
    values["time/wall_s"] = (view.result or {}).get("wall_s")
    return {k: float(v) for k, v in values.items() if finite(v) is not None}


def flat_config(config: dict, prefix: str = "") -> dict:
    """Nested config -> {"dpo/beta": 0.1, ...} with scalar values only (what hparams accept)."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, f"{name}/"))
        elif isinstance(value, (str, int, float, bool)):
            out[name] = value
        elif isinstance(value, list):
            out[name] = ",".join(map(str, value))
    return out


def log_run(run: RunView, log_with: list, logging_dir: Path) -> int:
    """Log every finished round of `run` to the trackers named in `log_with` (names or
    accelerate GeneralTracker instances); returns the number of rounds logged.

    The tracker's own package must be installed (`pip install tensorboard`, `pip install wandb`);
    accelerate silently skips a tracker whose package is missing, so that case is an error here."""
    from accelerate import Accelerator
    from accelerate.tracking import GeneralTracker, get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    missing = [t for t in log_with if not isinstance(t, GeneralTracker) and str(t) not in available]
    if missing:
        raise ReportError(f"tracker(s) {', '.join(map(str, missing))} not available: install the package "
                          f"(e.g. `pip install tensorboard` or `pip install wandb`); available here: "
                          f"{', '.join(sorted(available)) or 'none'}")
    accelerator = Accelerator(log_with=log_with, project_dir=str(logging_dir), cpu=True)
    accelerator.init_trackers(run.name, config=flat_config(run.config))
    logged = 0
    for view in run.rounds:
        if view.complete:
            accelerator.log(round_metrics(view), step=view.round)
            logged += 1
    accelerator.end_training()
    return logged
