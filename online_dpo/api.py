"""The Python API: load a config, run a campaign with any judge (a judge object, or a plain
function that scores one response), resume it, and read its results. The CLI runs through it.

    import online_dpo

    def shorter_is_better(prompt: str, response: str, reference: str | None) -> float:
        return -len(response)

    cfg = online_dpo.load_config("configs/quickstart.yaml", ["rounds=2", "name=short"])
    run = online_dpo.run(cfg, judge=shorter_is_better)
    print(run.best.round, [r.eval.get("accuracy") for r in run.rounds])
    run = online_dpo.resume(cfg.run_dir, ["rounds=3"], judge=shorter_is_better)

A judge passed as an object is recorded in the run's config as `judge.name: python:<its name>`;
resuming such a run needs the same judge passed again.
"""

from __future__ import annotations

import dataclasses
import errno
import shutil
from pathlib import Path
from typing import Sequence

from judges.base import JudgeLoadError, as_judge
from judges.models import ModelError
from judges.registry import PYTHON_JUDGE_PREFIX
from online_dpo.config import CampaignConfig, ConfigError, config_from_dict, load_config, to_dict
from online_dpo.errors import GenerationServerError, OutOfDiskSpace, UserError
from online_dpo.report.view import RunView, load_run
from online_dpo.rundir import MANIFEST, RunDir


def run(config: CampaignConfig | str | Path, overrides: Sequence[str] = (), *, judge: object | None = None,
        overwrite: bool = False) -> RunView | None:
    """Start a campaign from a config (or a YAML path, with `key=value` overrides) and run it to
    the end. `judge` replaces the judge the config names. Returns the run's results on the
    main process (None on the others, under `accelerate launch`)."""
    if isinstance(config, CampaignConfig):
        if overrides:
            raise ConfigError("overrides apply to a YAML path; for a CampaignConfig, load it with "
                              "online_dpo.load_config(path, overrides) or dataclasses.replace it")
        cfg = config_from_dict(to_dict(config))  # built or changed in Python: the checks a YAML config gets
    else:
        cfg = load_config(config, list(overrides))
    if judge is not None:
        name = as_judge(judge, "judge=").name
        cfg = dataclasses.replace(cfg, judge=dataclasses.replace(cfg.judge, name=f"{PYTHON_JUDGE_PREFIX}{name}",
                                                                 options={}))
    state = process_state()
    if state.is_main_process:
        RunDir.create(cfg.run_dir, to_dict(cfg), seeds={"campaign": cfg.seed, "data": cfg.data.seed},
                      overwrite=overwrite)
        print(f"run directory: {cfg.run_dir}")
    state.wait_for_everyone()
    try:
        return _campaign(cfg, cfg.run_dir, judge, state.is_main_process)
    except (UserError, ModelError, JudgeLoadError):  # input to fix (exit 2), not a run to resume
        # Stopped by its own input (a judge file that fails to load, a data file that is not
        # there) before any stage finished: removed, so the same command starts again once the
        # mistake is fixed. Other failures (a server down, a full disk) keep the run: their
        # messages say to resume it.
        if state.is_main_process:
            RunDir(cfg.run_dir).remove_failed_start()  # the manifest as the failed run left it
        raise


def resume(run_dir: str | Path, overrides: Sequence[str] = (), *, judge: object | None = None) -> RunView | None:
    """Continue a campaign from its run directory: unfinished stages run, finished ones are read
    back. Overrides such as `rounds=5` extend a finished campaign."""
    directory = RunDir(run_dir)
    if not directory.manifest_path.exists():
        raise ConfigError(f"{directory.root} is not a run directory (no {MANIFEST}); start one with `online-dpo run CONFIG`")
    cfg = load_config(directory.config_path, list(overrides))
    state = process_state()
    if state.is_main_process:
        for path in directory.remove_stale_temps():
            print(f"removed an unfinished write left by the interrupted run: {path}")
        directory.record_resume(to_dict(cfg), list(overrides))  # e.g. rounds=5 extends a finished campaign
        print(f"resuming {directory.root}")
    state.wait_for_everyone()
    return _campaign(cfg, directory.root, judge, state.is_main_process)


def results(run_dir: str | Path) -> RunView:
    """What a run directory holds, finished or not: every round's eval record, training steps and
    warnings (`RunView.rounds`), and the best policy (`RunView.best`)."""
    return load_run(run_dir)


def process_state():
    """accelerate's process state (one process, or several under torch.distributed.run /
    accelerate launch): only the main process creates or changes the run directory."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _campaign(cfg: CampaignConfig, root: Path, judge: object | None, main: bool) -> RunView | None:
    """run_campaign, with a full disk turned into what to do about it: every finished stage
    is already on disk (each is written to a temp name and renamed), so nothing is lost."""
    from online_dpo.loop import run_campaign

    try:
        run_campaign(cfg, RunDir(root), judge)
    except GenerationServerError as e:
        e.args = (f"{e}. Every finished stage is saved (a round's candidates only once all of them are in, so none "
                  f"is lost or kept twice); once the server answers again, continue with `online-dpo resume {root}`",)
        raise
    except Exception as e:
        if not _is_disk_full(e):
            raise
        checkpoint = _checkpoint_size(root)
        per_round = f" A round's checkpoint here takes {_size(checkpoint)}." if checkpoint else ""
        raise OutOfDiskSpace(
            f"no space left on the disk that holds {root} ({_size(shutil.disk_usage(root).free)} free): {e}.{per_round} "
            f"Every finished stage is saved and the partial write was removed. Free some space "
            f"(save_checkpoints=last keeps only the newest and the best round's checkpoints), then continue with "
            f"`online-dpo resume {root}`.") from e
    return load_run(root) if main else None


def _is_disk_full(error: BaseException | None) -> bool:
    # safetensors reports a full disk as its own SafetensorError ("... (os error 28)"), not an
    # OSError, so look at the message too, and down the chain of causes.
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(error) or "os error 28" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"


def _checkpoint_size(root: Path) -> int:
    run = RunDir(root)
    checkpoints = (run.round_paths(r).checkpoint for r in run.rounds_on_disk())
    return max((sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) for ckpt in checkpoints), default=0)


__all__ = ["load_config", "resume", "results", "run"]
