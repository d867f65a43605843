"""Command line: `online-dpo run CONFIG [key=value ...]`, `online-dpo resume RUN_DIR [key=value ...]`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def _configure_threads() -> None:
    # vLLM's CPU backend drops torch to one thread unless OMP_NUM_THREADS is set; both the
    # engine and the DPO update run in this process, so give them every core.
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))


def _run(args) -> int:
    from online_dpo.campaign import run_campaign
    from online_dpo.config import load_config, to_dict
    from online_dpo.rundir import RunDir

    cfg = load_config(args.config, args.overrides)
    if args.overwrite and cfg.run_dir.exists():
        import shutil

        shutil.rmtree(cfg.run_dir)
    run = RunDir.create(cfg.run_dir, to_dict(cfg), seeds={"campaign": cfg.seed, "data": cfg.data.seed})
    print(f"run directory: {run.root}")
    run_campaign(cfg, run)
    return 0


def _resume(args) -> int:
    from online_dpo.campaign import run_campaign
    from online_dpo.config import ConfigError, load_config
    from online_dpo.rundir import RunDir

    root = Path(args.run_dir)
    if not (root / "manifest.json").exists():
        raise ConfigError(f"{root} is not a run directory (no manifest.json); start one with `online-dpo run CONFIG`")
    cfg = load_config(root / "config.yaml", args.overrides)
    run = RunDir(root)
    run_campaign(cfg, run)
    return 0


def main(argv: list[str] | None = None) -> int:
    _configure_threads()
    parser = argparse.ArgumentParser(prog="online-dpo", description="Online, iterative DPO with AI feedback.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="start a campaign from a YAML config")
    p_run.add_argument("config")
    p_run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. dpo.beta=0.2 rounds=2")
    p_run.add_argument("--overwrite", action="store_true", help="delete an existing run of the same name first")
    p_run.set_defaults(func=_run)
    p_resume = sub.add_parser("resume", help="continue a campaign from its run directory")
    p_resume.add_argument("run_dir")
    p_resume.add_argument("overrides", nargs="*", help="e.g. rounds=5 to extend a finished campaign")
    p_resume.set_defaults(func=_resume)
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("vllm", "transformers", "accelerate", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import datasets

    datasets.disable_progress_bars()  # per-file "Saving the dataset" bars drown the round table

    from online_dpo.config import ConfigError
    from online_dpo.data import DataError
    from online_dpo.models import ModelError

    from judges.openai_judge import BudgetExceeded, MissingAPIKey
    from judges.registry import UnknownJudgeError

    try:
        return args.func(args)
    except (ConfigError, DataError, ModelError, FileExistsError, MissingAPIKey, UnknownJudgeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BudgetExceeded as e:
        print(f"stopped: {e}. Every reply already paid for is cached and every finished stage is saved; "
              f"raise judge.options.max_cost / max_calls and continue with `online-dpo resume <run dir> "
              f"judge.options.max_calls=...`.", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
