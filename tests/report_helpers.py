"""A tiny real campaign (HF backend, 2 rounds) shared by the report tests. What the report reads
holds for any policy, so it runs on the shallow model (tests/conftest.py) with the length judge.

It is made once per pytest session under the session's base temp folder (the one all pytest-xdist
workers share, under a file lock: the first module to need it makes it, the other waits for it),
so both report test modules reuse it; each test works on its own copy (the report writes into the run).
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

from tests.conftest import BY_LENGTH, run_python

TINY_RUN = [
    "rounds=2", "name=tiny", "generation.backend=hf", "data.train_prompts_per_round=4",
    "generation.samples_per_prompt=3", "generation.max_new_tokens=12", "eval.max_new_tokens=12",
    "data.eval_prompts=8", "dpo.batch_size=2", "dpo.epochs=1", "dpo.max_steps=-1", "eval.diversity_prompts=4",
    "eval.diversity_samples=3", *BY_LENGTH,
]


def tiny_run(tmp_path_factory, model: str) -> Path:
    # REPORT_TEST_RUN=<a finished run of TINY_RUN> reuses it (tests only read copies of it),
    # which saves minutes when iterating on the report alone.
    reuse = os.environ.get("REPORT_TEST_RUN")
    if reuse and (Path(reuse) / "round_001" / "eval.json").exists():
        return Path(reuse)
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    session = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # xdist: basetemp/popen-gwN
    out = session / "report-tiny-run"
    root = out / "tiny"
    with FileLock(session / "report-tiny-run.lock"):
        if not (root / "round_001" / "eval.json").exists():
            make_tiny_run(out, root, model)
    return root


def make_tiny_run(out: Path, root: Path, model: str) -> None:
    shutil.rmtree(out, ignore_errors=True)
    proc = run_python(["-m", "online_dpo.cli", "run", "configs/quickstart.yaml", f"output_dir={out}", *TINY_RUN,
                       f"policy.model={model}"], timeout=900)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    # The report never reads checkpoints; this run lives to the session's end, so free its ~0.5 GB now.
    for checkpoint in root.glob("round_*/checkpoint"):
        shutil.rmtree(checkpoint)
    (root / "best").unlink(missing_ok=True)  # the link to a checkpoint just removed


def copy_run(root: Path, dest: Path) -> Path:
    """The run without its checkpoints (hundreds of MB the report never reads)."""
    shutil.copytree(root, dest, ignore=shutil.ignore_patterns("checkpoint", "best"))
    return dest


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; raises if `data` is not a PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    assert data[12:16] == b"IHDR", "PNG without IHDR first"
    return struct.unpack(">II", data[16:24])
