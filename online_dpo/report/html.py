"""The report as report.html: one self-contained file (plots inlined as base64, no external asset)
with the per-round table, its warnings, the plots, and for each round a few held-out prompts
side by side: the initial policy's (baseline) response, the round's, and the judge's verdict."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import jinja2

from online_dpo.report.tables import (
    COLUMNS,
    DIVERSITY_COLUMNS,
    JUDGE_COLUMNS,
    diversity_rows,
    judge_rows,
    pass_cell,
    pct,
    table_rows,
)
from online_dpo.report.view import (
    RoundView,
    RunView,
    read_jsonl_tolerant,
)
from online_dpo.rundir import write_text

# A small inline script marks, once the page has loaded, how many plot images decoded
# (#image-check), so a headless browser (and a person) can see that nothing is broken.
TEMPLATE = jinja2.Template("""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>online-dpo report: {{ name }}</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
 table.rounds { border-collapse: collapse; font-size: 13px; }
 table.rounds th, table.rounds td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; }
 table.rounds th { background: #f0f0f0; }
 table.rounds td.warnings { text-align: left; color: #b00; max-width: 28em; }
 tr.incomplete td { color: #999; font-style: italic; }
 tr.warned td { background: #fff2f2; }
 .plots img { max-width: 48%; margin: 4px; border: 1px solid #ddd; vertical-align: top; }
 .plots img.wide { max-width: 97%; }
 .example { border: 1px solid #ccc; border-radius: 6px; margin: 0.8em 0; padding: 0.6em; }
 .side { display: flex; gap: 1em; }
 .side > div { flex: 1; min-width: 0; }
 pre { white-space: pre-wrap; word-wrap: break-word; background: #f7f7f7; padding: 0.4em; margin: 0.2em 0; }
 .verdict { font-weight: bold; }
 .warning { color: #b00; }
 .muted { color: #777; }
</style></head><body>
<h1>online-dpo report: {{ name }}</h1>
<p class="muted">{{ root }} &middot; generated {{ generated }} &middot; {{ complete }} of {{ rounds|length }} rounds finished
{% if baseline_accuracy %}&middot; baseline (initial policy) {{ baseline_accuracy }}{% endif %}</p>
<p>Win rates are of each round's policy on held-out prompts against the initial policy (the baseline,
before any update) and against the previous round; ties counted half, judge errors excluded (shown apart);
95% confidence intervals in brackets. LC win = length-controlled win rate (a logistic regression on the
length difference, as in AlpacaEval 2): the win rate at equal response length.</p>

<h2>Rounds</h2>
<table class="rounds" id="rounds">
<thead><tr>{% for c in columns %}<th>{{ c }}</th>{% endfor %}</tr></thead>
<tbody>
{% for r in rounds %}<tr class="round {{ r.css }}" data-round="{{ r.round }}">{% for cell in r.cells %}<td{% if loop.last %} class="warnings"{% endif %}>{{ cell }}</td>{% endfor %}</tr>
{% endfor %}</tbody></table>
{% for r in rounds if r.warnings %}{% for w in r.warnings %}<p class="warning">&#9888; round {{ r.round }}: {{ w }}</p>{% endfor %}{% endfor %}
{% if diversity %}
<h2>Diversity</h2>
<p>Across K samples of each of a fixed set of held-out prompts: distinct n-grams over all n-grams
(higher = more varied), the mean pairwise n-gram overlap of the samples (lower = more varied), and the
policy's mean token entropy on its own samples; in brackets, the share of the initial policy's.</p>
<table class="rounds" id="diversity">
<thead><tr>{% for c in diversity_columns %}<th>{{ c }}</th>{% endfor %}</tr></thead>
<tbody>
{% for row in diversity %}<tr>{% for cell in row %}<td>{{ cell }}</td>{% endfor %}</tr>
{% endfor %}</tbody></table>
{% endif %}
{% if judge %}
<h2>Judge quality</h2>
<p>From each round's round robins (pairwise judges): the share of verdicts that were ties, how often
the judge's two orders named the same response, the prompts whose candidates it separated beyond chance
(only those give a pair), and, where the task has reference answers, how often it picked the right
response of two where one is right (ties half) and the per-request flip rate that implies.</p>
<table class="rounds" id="judge">
<thead><tr>{% for c in judge_columns %}<th>{{ c }}</th>{% endfor %}</tr></thead>
<tbody>
{% for row in judge %}<tr>{% for cell in row %}<td>{{ cell }}</td>{% endfor %}</tr>
{% endfor %}</tbody></table>
{% endif %}

<h2>Plots</h2>
<div class="plots">{% for p in plots %}<img class="plot{% if p.wide %} wide{% endif %}" alt="{{ p.name }}" title="{{ p.name }}" src="data:image/png;base64,{{ p.data }}">{% endfor %}</div>
<p id="image-check" class="muted" data-loaded="" data-total="{{ plots|length }}">images: not checked yet</p>

<h2>Examples: the initial policy (baseline) vs each round</h2>
{% for r in rounds %}<section class="round-examples" data-round="{{ r.round }}">
<h3>Round {{ r.round }}{% if not r.examples %} <span class="muted">({{ r.status }})</span>{% endif %}</h3>
{% for e in r.examples %}<div class="example" data-round="{{ r.round }}">
<div><b>Prompt</b>{% if e.reference is not none %} <span class="muted">(reference: {{ e.reference }})</span>{% endif %}<pre>{{ e.prompt }}</pre></div>
<div class="side">
 <div><b>baseline (initial policy)</b><pre class="baseline">{{ e.baseline }}</pre></div>
 <div><b>after round {{ r.round }}</b><pre class="current">{{ e.current }}</pre></div>
</div>
<div class="verdict">Judge: {{ e.verdict }}</div>
{% if e.rationale %}<div><span class="muted">judge's text (A = after round {{ r.round }}, B = baseline):</span><pre class="rationale">{{ e.rationale }}</pre></div>{% endif %}
</div>{% endfor %}
</section>{% endfor %}
<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.querySelectorAll("img.plot"));
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var el = document.getElementById("image-check");
  el.setAttribute("data-loaded", String(ok));
  el.textContent = "images: " + ok + " of " + imgs.length + " loaded";
});
</script>
</body></html>
""", autoescape=True, undefined=jinja2.StrictUndefined)

WIDE_PLOTS = {"margins", "cost"}  # two panels each: shown full width
VERDICT_WORDS = {"a": "after round {r} is better", "b": "baseline is better", "tie": "tie"}


def pick_examples(items: list[dict], k: int) -> list[dict]:
    """Up to `k` comparisons showing each kind of outcome (win, loss, tie, error) before repeats,
    in prompt order within each kind, so the sample is deterministic and not all one kind."""
    kinds: dict[str, list[dict]] = {}
    for it in items:
        kinds.setdefault(it.get("winner") or "error", []).append(it)
    order = [kinds[k] for k in ("a", "b", "tie", "error") if k in kinds]
    picked: list[dict] = []
    depth = 0
    while len(picked) < k and any(depth < len(group) for group in order):
        picked += [group[depth] for group in order if depth < len(group)][: k - len(picked)]
        depth += 1
    return picked


def round_examples(run: RunView, view: RoundView, baseline: dict[str, dict], k: int) -> list[dict]:
    if not view.complete or k <= 0:
        return []
    current = {row["prompt_id"]: row for row in read_jsonl_tolerant(run.dir.round_paths(view.round).eval_responses)}
    items = (view.eval.get("comparisons") or {}).get("vs_baseline")
    if not items:  # eval.json from before verdicts were kept: the responses without a verdict
        items = [{"prompt_id": pid} for pid in current][:k]
    out = []
    for it in pick_examples(items, k):
        pid = it.get("prompt_id")
        winner = it.get("winner")
        if winner:
            verdict = VERDICT_WORDS[winner].format(r=view.round)
        elif it.get("error"):
            verdict = f"error ({it['error']}): counted neither as a win nor a loss"
        else:
            verdict = "- (not recorded)"
        out.append({
            "prompt": it.get("prompt") or f"- (prompt {pid}; its text was not recorded)",
            "reference": it.get("reference"),
            "baseline": (baseline.get(pid) or {}).get("text", "-"),
            "current": (current.get(pid) or {}).get("text", "-"),
            "verdict": verdict, "rationale": it.get("rationale") or "",
        })
    return out


def render_html(run: RunView, plots: dict[str, Path], examples: int = 3) -> str:
    baseline = {row["prompt_id"]: row for row in read_jsonl_tolerant(run.dir.baseline.eval_responses)}
    rounds = []
    for view, cells in zip(run.rounds, table_rows(run.rounds)):
        rounds.append({
            "round": view.round, "cells": cells, "warnings": view.warnings, "status": view.status,
            "css": "incomplete" if not view.complete else ("warned" if view.warnings else "done"),
            "examples": round_examples(run, view, baseline, examples),
        })
    images = [{"name": name, "data": base64.b64encode(Path(path).read_bytes()).decode("ascii"),
               "wide": name in WIDE_PLOTS} for name, path in plots.items()]
    initial = (f"pass rate by {run.baseline_pass['scorer']} {pass_cell(run.baseline_pass)}" if run.baseline_pass
               else f"accuracy {pct(run.baseline_accuracy)}" if run.baseline_accuracy is not None else "")
    return TEMPLATE.render(
        name=run.name, root=str(run.root), generated=time.strftime("%Y-%m-%d %H:%M:%S"),
        complete=sum(v.complete for v in run.rounds), baseline_accuracy=initial, columns=COLUMNS, rounds=rounds,
        plots=images,
        diversity=diversity_rows(run.rounds, run.baseline_diversity), diversity_columns=DIVERSITY_COLUMNS,
        judge=judge_rows(run.rounds), judge_columns=JUDGE_COLUMNS,
    )


def write_html(run: RunView, path: Path, plots: dict[str, Path], examples: int = 3) -> Path:
    write_text(path, render_html(run, plots, examples))
    path.chmod(0o644)  # meant to be shared (the atomic write's temp file starts private)
    return path
