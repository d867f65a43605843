"""The package layout: imports point one way (cli -> loop -> stages -> train / engines / data ->
rundir / config; report -> rundir), `judges` never imports `online_dpo`, there is no import
cycle, every module opens with a docstring, and no module grows past the size a reader takes in."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 420

# Lower layers never import higher ones. A module's layer is its longest matching prefix.
LAYERS: dict[str, int] = {
    "online_dpo.errors": 0,
    "online_dpo.seeds": 0,
    "online_dpo.config": 1,
    "online_dpo.rundir": 1,
    "online_dpo.hardware": 2,
    "online_dpo.data": 2,
    "online_dpo.separation": 2,
    "online_dpo.engines": 3,
    "online_dpo.train": 3,
    "online_dpo.pairs": 3,
    "online_dpo.labels": 3,
    "online_dpo.diversity": 3,
    "online_dpo.evaluate": 3,
    "online_dpo.judge_eval": 3,
    "online_dpo.judge_quality": 3,
    "online_dpo.report": 3,
    "online_dpo.objectives": 4,
    "online_dpo.campaign": 5,
    "online_dpo.stages": 6,
    "online_dpo.loop": 7,
    "online_dpo.compare": 8,
    "online_dpo.api": 8,
    "online_dpo": 9,  # the package itself: the public Python API
    "online_dpo.cli": 10,
}
# What the report may read: the run directory and nothing of the training side.
REPORT_MAY_IMPORT = ("online_dpo.report", "online_dpo.rundir", "online_dpo.config", "online_dpo.errors",
                     "online_dpo.evaluate")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_modules(package: str) -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports (at any depth: late imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def layer(module: str) -> int:
    match = max((prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")), key=len)
    return LAYERS[match]


MODULES = {**source_modules("online_dpo"), **source_modules("judges")}
GRAPH = {m: imported_modules(p, set(MODULES)) - {m} for m, p in MODULES.items()}


def test_every_online_dpo_module_has_a_layer():
    unplaced = [m for m in MODULES if m.startswith("online_dpo") and not any(
        m == prefix or m.startswith(prefix + ".") for prefix in LAYERS if prefix != "online_dpo") and m != "online_dpo"]
    assert not unplaced, f"give these modules a layer in LAYERS: {unplaced}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("online_dpo.")))
def test_imports_point_down(module):
    upward = sorted(dep for dep in GRAPH[module] if dep.startswith("online_dpo") and dep != "online_dpo"
                    and not dep.startswith(module + ".") and layer(dep) > layer(module))
    assert not upward, f"{module} (layer {layer(module)}) imports higher layers: " + ", ".join(
        f"{d} ({layer(d)})" for d in upward)


def test_report_reads_only_the_run_directory():
    for module in (m for m in MODULES if m.startswith("online_dpo.report")):
        wrong = sorted(d for d in GRAPH[module] if d.startswith("online_dpo") and not d.startswith(REPORT_MAY_IMPORT))
        assert not wrong, f"{module} imports {wrong}: the report depends only on what a run directory holds"


def test_judges_never_import_online_dpo():
    for module in (m for m in MODULES if m.startswith("judges")):
        wrong = sorted(d for d in GRAPH[module] if d.startswith("online_dpo"))
        assert not wrong, f"{module} imports {wrong}: judges are importable on their own"


def test_no_import_cycle():
    def cycle_from(start: str) -> list[str] | None:
        stack, on_path, done = [(start, iter(sorted(GRAPH[start])))], [start], set()
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                on_path.pop()
                done.add(node)
            elif child in on_path:
                return on_path[on_path.index(child):] + [child]
            elif child not in done:
                stack.append((child, iter(sorted(GRAPH[child]))))
                on_path.append(child)
        return None

    # A package's __init__ importing its own submodules is not a cycle of design.
    for m in GRAPH:
        GRAPH[m] = {d for d in GRAPH[m] if not (MODULES[m].name == "__init__.py" and d.startswith(m + "."))}
    cycles = [c for c in (cycle_from(m) for m in sorted(GRAPH)) if c]
    assert not cycles, "import cycle: " + " -> ".join(cycles[0])


def test_modules_open_with_a_docstring_and_stay_small():
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        if not tree.body and path.name == "__init__.py":
            continue
        doc = ast.get_docstring(tree)
        assert doc, f"{path.relative_to(ROOT)} opens without a docstring saying what it owns"
        summary = doc.split("\n\n")[0].splitlines()
        assert 1 <= len(summary) <= 4, f"{path.relative_to(ROOT)}: say what the module owns in 1-4 lines, then the details"
        lines = len(path.read_text().splitlines())
        assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines (at most {MAX_LINES}): split it"


def test_the_checker_sees_an_upward_import_and_a_cycle(tmp_path):
    """The rules above can fail: an upward import and a two-module cycle are both caught."""
    (tmp_path / "a.py").write_text('"""a."""\nimport online_dpo.loop\nimport b\n')
    (tmp_path / "b.py").write_text('"""b."""\nfrom a import x\n')
    deps = imported_modules(tmp_path / "a.py", {"online_dpo.loop", "b", "a"})
    assert deps == {"online_dpo.loop", "b"}
    assert layer("online_dpo.loop") > layer("online_dpo.stages.update") > layer("online_dpo.train.losses")
    assert "a" in imported_modules(tmp_path / "b.py", {"a", "b"})


RUN_DIR_NAMES = {"manifest.json", "config.yaml", "data.json", "summary.json", "best", "baseline", "plots", "report.html",
                 "trackers", "prompts.jsonl", "candidates.parquet", "judgments.parquet", "pairs", "examples",
                 "replay.jsonl", "funnel.json", "reference_logps.jsonl", "train_metrics.jsonl", "logp_drift.json",
                 "checkpoint", "eval.json", "eval_responses.jsonl", "diversity_samples.jsonl"}


def spelled_run_dir_paths(path: Path) -> list[str]:
    """Places in `path` that build a run-directory path by hand: `x / "eval.json"`, a
    "round_..." name, or a glob over round folders."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant) \
                and node.right.value in RUN_DIR_NAMES:
            found.append(f"line {node.lineno}: / {node.right.value!r}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("round_"):
            found.append(f"line {node.lineno}: {node.value!r}")
        elif isinstance(node, ast.JoinedStr) and any(isinstance(v, ast.Constant) and str(v.value).startswith("round_")
                                                     for v in node.values[:1]):
            found.append(f"line {node.lineno}: f'round_...'")
    return found


def test_run_directory_file_names_are_spelled_only_by_rundir():
    spelled = {str(p.relative_to(ROOT)): where for m, p in MODULES.items()
               if m.startswith("online_dpo") and m != "online_dpo.rundir" and (where := spelled_run_dir_paths(p))}
    assert not spelled, f"use RunDir / RoundPaths for these paths: {spelled}"


def test_the_file_name_check_sees_a_hand_spelled_path(tmp_path):
    (tmp_path / "m.py").write_text('"""m."""\nx = root / "eval.json"\ny = root.glob("round_*")\nz = f"round_{r:03d}"\n')
    lines = {int(where.split(":")[0].removeprefix("line ")) for where in spelled_run_dir_paths(tmp_path / "m.py")}
    assert lines == {2, 3, 4}
