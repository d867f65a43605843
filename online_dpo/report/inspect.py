"""`online-dpo inspect runs/<name> --round N`: one round's pairs, candidates with their judge
scores, or held-out verdicts, read from the run directory, filtered, and shown in the terminal."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from rich.console import Console
from rich.table import Table

from online_dpo.report.view import ReportError, open_run_dir, read_json_or_none, read_jsonl_tolerant
from online_dpo.rundir import RoundPaths, RunDir, read_parquet

# Three views of a round, each a list of plain dicts (so filters are pure functions):
# - pairs       the preference pairs the update trained on (pairs/), with score margins;
# - candidates  every train prompt's K candidates with the judge's score, error and raw text;
# - eval        the held-out comparisons (eval.json): the round's response vs the initial
#               (or previous) policy's, the verdict, its rationale and position consistency.
# Filters: --largest/--smallest margins (pairs; candidates by score spread), --ties
# (candidates: prompts dropped as ties; eval: tied verdicts), --errors (judge failures),
# --inconsistent (eval verdicts that flipped when A and B were swapped), --grep on the
# prompt text, --limit.
View = Literal["pairs", "candidates", "eval"]
SUPPORTED = {  # view -> the filters that mean something there
    "pairs": {"largest", "smallest", "grep"},
    "candidates": {"largest", "smallest", "ties", "errors", "grep"},
    "eval": {"ties", "errors", "inconsistent", "grep"},
}
CELL_CHARS = 400  # long responses are cut in the table (the files hold them whole)


@dataclass
class Filters:
    order: Literal["largest", "smallest"] | None = None
    ties: bool = False
    errors: bool = False
    inconsistent: bool = False
    grep: str | None = None
    limit: int = 20

    def active(self) -> set[str]:
        names = {n for n in ("ties", "errors", "inconsistent") if getattr(self, n)}
        if self.order:
            names.add(self.order)
        if self.grep:
            names.add("grep")
        return names


def default_view(f: Filters) -> View:
    """The view a filter makes sense in when none is named."""
    if f.inconsistent:
        return "eval"
    if f.ties or f.errors:
        return "candidates"
    return "pairs"


def check_filters(view: View, f: Filters) -> None:
    unsupported = sorted(f.active() - SUPPORTED[view])
    if unsupported:
        where = {name: [v for v, names in SUPPORTED.items() if name in names] for name in unsupported}
        hints = "; ".join(f"--{n} works with --what {' or '.join(vs)}" for n, vs in where.items())
        raise ReportError(f"--what {view} has no {', '.join('--' + n for n in unsupported)} filter ({hints})")


# --- reading a round --------------------------------------------------------------------

def _round(root: Path, r: int) -> tuple[RunDir, RoundPaths]:
    run_dir = open_run_dir(root)
    if run_dir is None:
        raise ReportError(f"{root} is not a run directory (no manifest.json)")
    paths = run_dir.round_paths(r)
    if not paths.dir.is_dir():
        have = run_dir.rounds_on_disk()
        raise ReportError(f"{root} has no round {r}; rounds on disk: {have or 'none yet'}")
    return run_dir, paths


def _prompts(paths: RoundPaths) -> dict[str, dict]:
    out = {}
    for rec in read_jsonl_tolerant(paths.prompts):
        messages = rec.get("messages") or []
        text = messages[0]["content"] if len(messages) == 1 else "\n".join(f"{m['role']}: {m['content']}" for m in messages)
        out[rec["id"]] = {"text": text, "reference": rec.get("reference")}
    return out


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise ReportError(f"{path} does not exist: this round has not reached {what} yet "
                          f"(the campaign is still running or was interrupted before it)")
    return path


def _messages_text(value) -> str:
    if isinstance(value, list):
        return "\n".join(m.get("content", "") for m in value if isinstance(m, dict))
    return str(value)


def pair_rows(root: Path, r: int) -> list[dict]:
    from datasets import load_from_disk

    _, paths = _round(root, r)
    if paths.examples.exists():
        raise ReportError(f"{paths.dir} holds KTO examples (dpo.loss=kto), not pairs; see each candidate's score "
                          f"with --what candidates, or load {paths.examples} with datasets.load_from_disk")
    pairs = load_from_disk(str(_need(paths.pairs, "pair selection")))
    return [{"prompt_id": row.get("prompt_id"), "prompt": _messages_text(row["prompt"]),
             "chosen": _messages_text(row["chosen"]), "rejected": _messages_text(row["rejected"]),
             "score_chosen": row.get("score_chosen"), "score_rejected": row.get("score_rejected"),
             "margin": row.get("margin")} for row in pairs]


def candidate_groups(root: Path, r: int) -> list[dict]:
    """One dict per train prompt: its candidates with scores, the score spread, tie / error flags."""
    run_dir, paths = _round(root, r)
    candidates = read_parquet(_need(paths.candidates, "generation"))
    judged = {(j["prompt_id"], j["index"]): j for j in read_parquet(_need(paths.judgments, "judging"))}
    prompts = _prompts(paths)
    try:
        min_margin = float((yaml.safe_load(run_dir.config_path.read_text()) or {}).get("pairs", {}).get("min_margin", 0.0))
    except (FileNotFoundError, yaml.YAMLError, AttributeError):
        min_margin = 0.0
    groups: dict[str, dict] = {}
    for c in candidates:
        pid = c["prompt_id"]
        g = groups.setdefault(pid, {"prompt_id": pid, "prompt": prompts.get(pid, {}).get("text", pid),
                                    "reference": prompts.get(pid, {}).get("reference"), "candidates": []})
        j = judged.get((pid, c["index"]), {})
        g["candidates"].append({"index": c["index"], "text": c["text"], "score": j.get("score"),
                                "error": j.get("error"), "raw": j.get("raw") or ""})
    for g in groups.values():
        g["candidates"].sort(key=lambda c: c["index"])
        scores = [c["score"] for c in g["candidates"] if c["score"] is not None]
        g["spread"] = max(scores) - min(scores) if len(scores) >= 2 else None
        g["tie"] = g["spread"] is not None and g["spread"] <= min_margin
        g["errors"] = sum(c["error"] is not None for c in g["candidates"])
    return list(groups.values())


def eval_rows(root: Path, r: int, vs: Literal["baseline", "previous"] = "baseline") -> list[dict]:
    """The held-out comparisons of round r vs the baseline (or round r-1), with both responses."""
    run_dir, paths = _round(root, r)
    result = read_json_or_none(_need(paths.eval_json, "evaluation"))
    items = ((result.get("eval") or {}).get("comparisons") or {}).get(f"vs_{vs}")
    if items is None:
        raise ReportError(f"{paths.eval_json} records no per-comparison verdicts vs {vs} "
                          f"({'round 0 has no previous round; ' if vs == 'previous' and r == 0 else ''}"
                          f"eval.json files written before verdicts were kept only hold the totals)")
    other = run_dir.baseline if vs == "baseline" else run_dir.round_paths(r - 1)
    texts_a = {row["prompt_id"]: row["text"] for row in read_jsonl_tolerant(paths.eval_responses)}
    texts_b = {row["prompt_id"]: row["text"] for row in read_jsonl_tolerant(other.eval_responses)}
    return [{**it, "response": texts_a.get(it["prompt_id"], "-"), "other": texts_b.get(it["prompt_id"], "-")}
            for it in items]


# --- filtering (pure) -------------------------------------------------------------------

def select(view: View, rows: list[dict], f: Filters) -> list[dict]:
    """Apply the filters of `f` to the rows of `view` and cut to f.limit (0 = all)."""
    check_filters(view, f)
    if f.grep:
        needle = f.grep.lower()
        rows = [row for row in rows if needle in (row.get("prompt") or "").lower()]
    if view == "candidates":
        if f.ties:
            rows = [g for g in rows if g["tie"]]
        if f.errors:
            rows = [g for g in rows if g["errors"]]
        key = "spread"
    else:
        key = "margin"
    if view == "eval":
        if f.ties or f.errors:
            rows = [row for row in rows if (f.ties and row.get("winner") == "tie") or (f.errors and row.get("error"))]
        if f.inconsistent:
            rows = [row for row in rows if row.get("position_consistent") is False]
    if f.order:
        rows = sorted((row for row in rows if row.get(key) is not None), key=lambda row: row[key],
                      reverse=f.order == "largest")
    return rows[: f.limit] if f.limit > 0 else rows


# --- rendering --------------------------------------------------------------------------

def _cut(text, n: int = CELL_CHARS) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= n else text[: n - 1] + "…"


def _score(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def render(view: View, rows: list[dict], total: int, r: int, vs: str = "baseline") -> Table:
    title = {"pairs": f"round {r}: preference pairs", "candidates": f"round {r}: candidates and judge scores",
             "eval": f"round {r}: held-out comparisons vs {vs} (A = after round {r}, B = {vs})"}[view]
    table = Table(title=f"{title} — {len(rows)} of {total} shown", show_lines=True)
    if view == "pairs":
        for col in ("prompt", "chosen", "rejected", "score chosen", "score rejected", "margin"):
            table.add_column(col, overflow="fold")
        for row in rows:
            table.add_row(_cut(row["prompt"]), _cut(row["chosen"]), _cut(row["rejected"]), _score(row["score_chosen"]),
                          _score(row["score_rejected"]), _score(row["margin"]))
    elif view == "candidates":
        for col in ("prompt", "#", "candidate", "score", "judge error / raw"):
            table.add_column(col, overflow="fold")
        for g in rows:
            flag = " [tie: no pair]" if g["tie"] else ""
            for i, c in enumerate(g["candidates"]):
                head = f"{_cut(g['prompt'])}\n(ref {g['reference']}, spread {_score(g['spread'])}){flag}" if i == 0 else ""
                table.add_row(head, str(c["index"]), _cut(c["text"]), _score(c["score"]),
                              _cut(c["error"] or c["raw"], 200), style="red" if c["error"] else None)
            table.add_section()
    else:
        for col in ("prompt", f"after round {r}", vs, "verdict", "consistent", "judge's text"):
            table.add_column(col, overflow="fold")
        for row in rows:
            verdict = {"a": f"after round {r}", "b": vs, "tie": "tie"}.get(row.get("winner"), f"error: {row.get('error')}")
            consistent = {True: "yes", False: "FLIPPED", None: "-"}[row.get("position_consistent")]
            table.add_row(_cut(row.get("prompt")), _cut(row["response"]), _cut(row["other"]), verdict, consistent,
                          _cut(row.get("rationale"), 300), style="red" if row.get("error") else None)
    return table


def inspect(root: str | Path, r: int, view: View | None = None, f: Filters | None = None,
            vs: Literal["baseline", "previous"] = "baseline", console: Console | None = None) -> list[dict]:
    """Print the filtered view of round `r`; returns the rows shown."""
    root, f = Path(root), f or Filters()
    view = view or default_view(f)
    check_filters(view, f)
    rows = {"pairs": lambda: pair_rows(root, r), "candidates": lambda: candidate_groups(root, r),
            "eval": lambda: eval_rows(root, r, vs)}[view]()
    shown = select(view, rows, f)
    console = console or Console(width=max(Console().width, 160))
    console.print(render(view, shown, len(rows), r, vs))
    if not shown:
        console.print(f"[yellow]nothing matches the filters ({', '.join(sorted(f.active())) or 'none'})[/]")
    return shown


def rows_as_json(rows: list[dict]) -> str:
    return json.dumps(rows, indent=2, default=str)
