"""`online-dpo report` and `online-dpo inspect` on a real two-round run (HF backend), on the
same run interrupted, and the warning rules on hand-made rounds."""

import base64
import io
import json
import re

import pytest
from markupsafe import escape
from PIL import Image
from rich.console import Console

from online_dpo.report.inspect import (
    Filters,
    candidate_groups,
    check_filters,
    default_view,
    select,
)
from online_dpo.report.tables import COLUMNS, table_rows
from online_dpo.report.view import ReportError, RoundView, add_warnings, train_summary
from tests.conftest import run_python
from tests.report_helpers import copy_run, png_size, tiny_run


@pytest.fixture(scope="module")
def run_root(tmp_path_factory, shallow_model_path):
    return tiny_run(tmp_path_factory, shallow_model_path)


@pytest.fixture
def run_copy(run_root, tmp_path):
    return copy_run(run_root, tmp_path / "tiny")


def report(root, *args):
    proc = run_python(["-m", "online_dpo.cli", "report", str(root), *args], timeout=300)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return proc.stdout


def table_cells(stdout: str) -> dict[int, list[str]]:
    """round -> its cells in the (first) rich table, with cells folded over several lines joined."""
    lines: dict[int, list[str]] = {}
    current = None
    for line in stdout.splitlines():
        if line.startswith("└"):
            break  # the per-round table ends; the diversity table follows
        if m := re.match(r"^│\s+(\d+)\s+│", line):
            current = int(m.group(1))
            lines[current] = [line]
        elif current is not None and re.match(r"^│\s+│", line):
            lines[current].append(line)  # continuation: the round cell is empty
        else:
            current = None
    table = {}
    for r, rows in lines.items():
        split = [[c.strip() for c in row.strip("│").split("│")] for row in rows]
        table[r] = [" ".join(part for part in column if part) for column in zip(*split)]
    return table


def valid_png(data: bytes) -> tuple[int, int]:
    width, height = png_size(data)
    Image.open(io.BytesIO(data)).verify()  # decodes every chunk's CRC
    assert width > 100 and height > 100
    return width, height


def test_eval_json_keeps_what_the_report_reads(run_root):
    ev = json.loads((run_root / "round_001" / "eval.json").read_text())["eval"]
    items = ev["comparisons"]["vs_baseline"]
    assert len(items) == ev["vs_baseline"]["n"] == 8
    assert all(i["prompt"] and (i["winner"] or i["error"]) for i in items)
    assert set(ev["response_tokens"]) == {"mean", "median", "p90", "max"}
    assert 0.0 <= ev["vs_baseline"]["lc_win_rate"] <= 1.0
    assert len(ev["comparisons"]["vs_previous"]) == 8


def test_report_lists_every_round_and_writes_plots_and_html(run_copy):
    out = report(run_copy)
    assert max(len(line) for line in out.splitlines()) <= 120  # the summary fits an ordinary terminal
    summary = table_cells(out)
    assert sorted(summary) == [0, 1], out
    for r in (0, 1):
        ev = json.loads((run_copy / f"round_{r:03d}" / "eval.json").read_text())["eval"]
        base = ev["vs_baseline"]
        assert summary[r][:2] == [str(r), f"{100 * base['win_rate']:.1f}% ({100 * base['ci_low']:.1f}-{100 * base['ci_high']:.1f})"]
        passed = ev["pass"]  # the tiny run's prompts carry references: the reference check, as the accuracy
        assert passed["scorer"] == "reference" and passed["pass_rate"] == ev["accuracy"] and len(summary[r]) == 8
        assert summary[r][3] == f"{100 * passed['pass_rate']:.1f}% ({100 * passed['ci_low']:.1f}-{100 * passed['ci_high']:.1f})"
        record = json.loads((run_copy / f"round_{r:03d}" / "eval.json").read_text())
        eval_errors = ev["vs_baseline"]["errors"] + (ev.get("vs_previous") or {}).get("errors", 0)
        train_errors = (record.get("judge_quality") or {}).get("errors", record["funnel"]["judge_errors"])
        assert summary[r][5] == f"{train_errors} / {eval_errors}"  # judge errors: training / eval
    out = report(run_copy, "--wide")  # every column
    rows = table_cells(out)
    assert sorted(rows) == [0, 1], out
    assert max(len(line) for line in out.splitlines()) > 120 and len(rows[0]) == len(COLUMNS)
    for r in (0, 1):
        ev = json.loads((run_copy / f"round_{r:03d}" / "eval.json").read_text())["eval"]
        base = ev["vs_baseline"]
        assert rows[r][1] == f"{100 * base['win_rate']:.1f}% ({100 * base['ci_low']:.1f}-{100 * base['ci_high']:.1f})"
        assert rows[r][2] == f"{100 * base['lc_win_rate']:.1f}%"
        last = json.loads((run_copy / f"round_{r:03d}" / "train_metrics.jsonl").read_text().splitlines()[-1])
        assert rows[r][9] == f"{last['loss']:.3f}" and rows[r][10] == f"{last['reward_margin']:.3f}"
        assert rows[r][5] == ("-" if r == 0 else f"{100 * ev['vs_previous']['win_rate']:.1f}%"
                              f" ({100 * ev['vs_previous']['ci_low']:.1f}-{100 * ev['vs_previous']['ci_high']:.1f})")
    plots = sorted(p.name for p in (run_copy / "plots").glob("*.png"))
    assert plots == ["cost.png", "length.png", "margins.png", "win_rate.png"]
    for p in (run_copy / "plots").glob("*.png"):
        valid_png(p.read_bytes())

    html = (run_copy / "report.html").read_text()
    # Self-contained: no external URL, stylesheet or script source; every image inline and decodable.
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", html)
    assert "<link" not in html and "<script src" not in html
    images = re.findall(r'<img[^>]*src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == 4 and len(images) == html.count("<img")
    for data in images:
        valid_png(base64.b64decode(data))
    assert len(re.findall(r'<tr class="round [^"]*" data-round="\d+"', html)) == 2
    # examples: baseline and current responses of the same prompt, with the verdict
    base = {json.loads(line)["prompt_id"]: json.loads(line)["text"]
            for line in (run_copy / "baseline" / "eval_responses.jsonl").read_text().splitlines()}
    for r in (0, 1):
        section = html.split(f'<section class="round-examples" data-round="{r}">')[1].split("</section>")[0]
        assert section.count('<div class="example"') == 3
        assert "Judge: " in section and 'class="baseline"' in section and 'class="current"' in section
        items = json.loads((run_copy / f"round_{r:03d}" / "eval.json").read_text())["eval"]["comparisons"]["vs_baseline"]
        shown = [i for i in items if str(escape(i["prompt"])) in section]
        assert len(shown) == 3, "each example is one of the round's held-out comparisons"
        assert str(escape(base[shown[0]["prompt_id"]])) in section


def test_report_on_an_interrupted_run(run_copy):
    # Killed during round 1's eval: no eval.json, no eval marker in the manifest.
    (run_copy / "round_001" / "eval.json").unlink()
    manifest = json.loads((run_copy / "manifest.json").read_text())
    del manifest["rounds"]["1"]["eval"]
    (run_copy / "manifest.json").write_text(json.dumps(manifest))
    out = report(run_copy)
    rows = table_cells(out)
    assert sorted(rows) == [0, 1]
    assert rows[1][1] == "incomplete (done: checkpoint)" and set(rows[1][2:]) == {"-"}
    assert "%" in rows[0][1] and "1 of 2 rounds finished" in out
    html = (run_copy / "report.html").read_text()
    assert '<tr class="round incomplete" data-round="1"' in html
    assert len(list((run_copy / "plots").glob("*.png"))) == 4


def test_report_before_any_round_finished(run_copy):
    for r in (0, 1):
        (run_copy / f"round_{r:03d}" / "eval.json").unlink()
    out = report(run_copy)
    assert "0 of 2 rounds finished" in out and sorted(table_cells(out)) == [0, 1]
    for p in (run_copy / "plots").glob("*.png"):
        valid_png(p.read_bytes())


def test_report_names_a_directory_that_is_not_a_run(tmp_path):
    proc = run_python(["-m", "online_dpo.cli", "report", str(tmp_path)], timeout=120)
    assert proc.returncode == 2 and "not a run directory" in proc.stderr


def test_length_factor_option_drives_the_length_warning(run_copy):
    path = run_copy / "round_001" / "eval.json"
    res = json.loads(path.read_text())
    res["eval"]["vs_baseline"]["lc_win_rate"] = 0.4  # not better once length is controlled
    path.write_text(json.dumps(res))
    base_tokens = [json.loads(line)["tokens"] for line in (run_copy / "baseline" / "eval_responses.jsonl").read_text().splitlines()]
    ratio = res["eval"]["response_tokens"]["mean"] / (sum(base_tokens) / len(base_tokens))
    below, above = ratio * 0.9, ratio * 1.1
    quiet = table_cells(report(run_copy, "--wide", "--length-factor", f"{above:.4f}"))[1][-1]
    assert "baseline's length" not in quiet
    assert "the baseline&#39;s length" not in (run_copy / "report.html").read_text()
    warned = table_cells(report(run_copy, "--wide", "--length-factor", f"{below:.4f}"))[1][-1]
    assert "baseline's length" in warned and "LC win rate 40.0%" in warned
    summary = report(run_copy, "--length-factor", f"{below:.4f}")  # the summary counts it and prints it in full below
    assert table_cells(summary)[1][-1] == "1"
    assert re.search(r"^round 1: responses .*baseline's length", summary, re.M)
    assert "the baseline&#39;s length" in (run_copy / "report.html").read_text()


def view(r, **ev) -> RoundView:
    return RoundView(r, result={"round": r, "eval": ev})


def test_warning_rules():
    grown = view(1, vs_baseline={"win_rate": 0.7, "lc_win_rate": 0.5}, response_tokens={"mean": 40.0})
    honest = view(2, vs_baseline={"win_rate": 0.7, "lc_win_rate": 0.62}, response_tokens={"mean": 40.0})
    short = view(3, vs_baseline={"win_rate": 0.6, "lc_win_rate": 0.45}, response_tokens={"mean": 25.0})
    worse = view(4, vs_previous={"win_rate": 0.40, "ci_low": 0.33, "ci_high": 0.47})
    unsure = view(5, vs_previous={"win_rate": 0.45, "ci_low": 0.38, "ci_high": 0.52})
    incomplete = RoundView(6, stages=["generate"])
    rounds = [grown, honest, short, worse, unsure, incomplete]
    add_warnings(rounds, length_factor=1.5, baseline_tokens=[20] * 10)
    assert ["2.00x" in w for w in grown.warnings] == [True]
    assert honest.warnings == [] and short.warnings == [] and unsure.warnings == [] and incomplete.warnings == []
    assert len(worse.warnings) == 1 and "worse than round 3" in worse.warnings[0]
    rows = table_rows(rounds)
    assert "2.00x" in rows[0][-1] and rows[1][-1] == "-" and rows[5][1] == "incomplete (done: generate)"


def test_likelihood_displacement_warning_fires_when_the_chosen_likelihood_falls():
    def trained(r, chosen, rejected):
        return RoundView(r, result={"round": r, "eval": {}, "train": {"logp_drift": {"chosen": chosen, "rejected": rejected}}})

    displaced, anchored, untrained = trained(0, -1.4, -9.0), trained(1, 0.3, -6.0), view(2)
    add_warnings([displaced, anchored, untrained])
    assert len(displaced.warnings) == 1 and "chosen responses' likelihood fell" in displaced.warnings[0]
    assert "-1.40 nats (rejected -9.00)" in displaced.warnings[0] and "dpo.rpo_alpha" in displaced.warnings[0]
    assert anchored.warnings == [] and untrained.warnings == []
    rows = table_rows([displaced, anchored, untrained])
    column = list(COLUMNS).index("Δlogp c/r")
    assert [row[column] for row in rows] == ["-1.4/-9.0", "+0.3/-6.0", "-"]


def test_train_columns_are_the_last_steps_from_either_source():
    steps = [{"loss": 0.69, "reward_margin": 0.0, "pair_accuracy": 0.0, "kl": 0.0},
             {"loss": 0.4, "reward_margin": 1.5, "pair_accuracy": 0.75, "kl": 0.02}]
    from_file = RoundView(0, result={"round": 0, "eval": {}}, train_steps=steps)
    from_result = RoundView(0, result={"round": 0, "eval": {}, "train": {
        "steps": 2, "final_loss": 0.4, "final_reward_margin": 1.5, "final_pair_accuracy": 0.75, "final_kl": 0.02}})
    assert train_summary(from_file) == train_summary(from_result) == {
        "loss": 0.4, "reward_margin": 1.5, "pair_accuracy": 0.75, "kl": 0.02, "steps": 2}
    assert table_rows([from_file])[0][9:13] == ["0.400", "1.500", "75.0%", "0.0200"]
    assert table_rows([RoundView(1, result={"round": 1, "eval": {}})])[0][9:13] == ["-"] * 4


def test_length_ratio_falls_back_to_characters_without_baseline_tokens():
    items = [{"chars_a": 300, "chars_b": 100, "winner": "a"}] * 4
    v = view(1, vs_baseline={"lc_win_rate": 0.5}, response_tokens={"mean": 10.0}, comparisons={"vs_baseline": items})
    add_warnings([v], length_factor=2.0)
    assert v.warnings and "3.00x" in v.warnings[0]


# --- inspect ----------------------------------------------------------------------------

def inspect(root, *args):
    return run_python(["-m", "online_dpo.cli", "inspect", str(root), *args], timeout=300)


def test_inspect_pairs_sorted_by_margin(run_copy):
    from datasets import load_from_disk

    proc = inspect(run_copy, "--round", "0", "--json", "--smallest", "--limit", "0")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    pairs = load_from_disk(str(run_copy / "round_000" / "pairs"))
    assert len(rows) == len(pairs)
    assert [r["margin"] for r in rows] == sorted(pairs["margin"])
    assert "preference pairs" in proc.stderr  # the table still went to the terminal (stderr)


def test_inspect_ties_and_grep_on_candidates(run_copy):
    groups = candidate_groups(run_copy, 1)
    assert len(groups) == 4 and all(len(g["candidates"]) == 3 for g in groups)
    proc = inspect(run_copy, "--round", "1", "--ties", "--json")
    assert proc.returncode == 0, proc.stderr
    ties = json.loads(proc.stdout)
    assert {g["prompt_id"] for g in ties} == {g["prompt_id"] for g in groups if g["spread"] == 0}
    word = groups[0]["prompt"].split()[0]
    shown = select("candidates", groups, Filters(grep=word.upper(), limit=0))
    assert shown and all(word.lower() in g["prompt"].lower() for g in shown)


def test_inspect_inconsistent_and_errors_in_eval_verdicts(run_copy):
    path = run_copy / "round_001" / "eval.json"
    res = json.loads(path.read_text())
    items = res["eval"]["comparisons"]["vs_baseline"]
    items[1].update(winner="tie", error=None, rationale="AB: 'A' | BA: 'A'", position_consistent=False)
    items[2].update(winner=None, error="timeout", rationale="")
    path.write_text(json.dumps(res))
    flipped = json.loads(inspect(run_copy, "--round", "1", "--inconsistent", "--json").stdout)
    assert [r["prompt_id"] for r in flipped] == [items[1]["prompt_id"]]
    assert flipped[0]["response"] != "-" and flipped[0]["other"] != "-"  # both responses joined in
    errors = json.loads(inspect(run_copy, "--round", "1", "--what", "eval", "--errors", "--json").stdout)
    assert [r["prompt_id"] for r in errors] == [items[2]["prompt_id"]]
    prev = inspect(run_copy, "--round", "0", "--what", "eval", "--vs", "previous")
    assert prev.returncode == 2 and "no previous round" in prev.stderr


def test_inspect_errors_are_explained(run_copy):
    bad = inspect(run_copy, "--round", "0", "--what", "pairs", "--ties")
    assert bad.returncode == 2 and "--ties works with --what candidates or eval" in bad.stderr
    missing = inspect(run_copy, "--round", "9")
    assert missing.returncode == 2 and "rounds on disk: [0, 1]" in missing.stderr


def test_filter_rules_are_pure():
    rows = [{"prompt": "Compute 2 + 2", "winner": "tie", "error": None, "position_consistent": True},
            {"prompt": "compute 3 x 3", "winner": None, "error": "timeout", "position_consistent": None},
            {"prompt": "Add 1 and 1", "winner": "a", "error": None, "position_consistent": False}]
    assert select("eval", rows, Filters(grep="COMPUTE")) == rows[:2]
    assert select("eval", rows, Filters(ties=True, errors=True)) == rows[:2]
    assert select("eval", rows, Filters(inconsistent=True)) == rows[2:]
    assert select("eval", rows, Filters(limit=1)) == rows[:1]
    assert default_view(Filters(inconsistent=True)) == "eval" and default_view(Filters(errors=True)) == "candidates"
    assert default_view(Filters(order="largest")) == "pairs"
    with pytest.raises(ReportError, match="--inconsistent works with --what eval"):
        check_filters("candidates", Filters(inconsistent=True))
    groups = [{"prompt": "p1", "spread": 0.0, "tie": True, "errors": 0},
              {"prompt": "p2", "spread": None, "tie": False, "errors": 3},
              {"prompt": "p3", "spread": 1.0, "tie": False, "errors": 1},
              {"prompt": "p4", "spread": 0.5, "tie": False, "errors": 0}]
    assert select("candidates", groups, Filters(ties=True)) == groups[:1]
    assert select("candidates", groups, Filters(errors=True)) == groups[1:3]
    assert [g["prompt"] for g in select("candidates", groups, Filters(order="largest"))] == ["p3", "p4", "p1"]
    pairs = [{"prompt": "a", "margin": 0.2}, {"prompt": "b", "margin": 0.9}, {"prompt": "c", "margin": 0.5}]
    assert [p["prompt"] for p in select("pairs", pairs, Filters(order="smallest", limit=2))] == ["a", "c"]


# --- trackers (accelerate's tracker API) ---------------------------------------------------

def test_rounds_go_to_an_accelerate_tracker(run_copy):
    from accelerate.tracking import GeneralTracker

    from online_dpo.report import build_report
    from online_dpo.report.view import load_run

    class Recorder(GeneralTracker):
        name = "recorder"
        requires_logging_directory = False

        def __init__(self):
            super().__init__()
            self.config, self.logged, self.finished = None, [], False

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            self.config = values

        def log(self, values, step=None, **kwargs):
            self.logged.append((step, values))

        def finish(self):
            self.finished = True

    recorder = Recorder()
    written = build_report(run_copy, console=Console(file=io.StringIO()), plots=False, html=False,
                           log_with=[recorder])
    assert written["tracked_rounds"] == 2 and recorder.finished
    assert recorder.config["dpo/beta"] == 0.1 and recorder.config["rounds"] == 2
    assert [step for step, _ in recorder.logged] == [0, 1]
    run = load_run(run_copy)
    for step, values in recorder.logged:
        assert values["vs_baseline/win_rate"] == run.rounds[step].eval["vs_baseline"]["win_rate"]
        assert "train/loss" in values and all(isinstance(v, float) for v in values.values())
        div = run.rounds[step].eval["diversity"]
        assert values["diversity/distinct_2"] == div["distinct_2"] and values["diversity/token_entropy"] == div["token_entropy"]
    assert "vs_previous/win_rate" in recorder.logged[1][1] and "vs_previous/win_rate" not in recorder.logged[0][1]


def test_a_missing_tracker_package_is_named(run_copy):
    from accelerate.tracking import get_available_trackers

    if "wandb" in {str(t) for t in get_available_trackers()}:
        pytest.skip("wandb is installed here")
    proc = run_python(["-m", "online_dpo.cli", "report", str(run_copy), "--log-with", "wandb"], timeout=300)
    assert proc.returncode == 2 and "pip install wandb" in proc.stderr


def test_stage_shares_keep_the_running_order_and_account_for_the_rest():
    from online_dpo.report.timing import stage_shares

    rows = stage_shares({"eval": 20.0, "setup": 10.0, "generate": 30.0, "drift": 0.0, "custom": 5.0}, wall_s=100.0)
    assert rows == [("setup", 10.0, 0.1), ("generate", 30.0, 0.3), ("eval", 20.0, 0.2), ("custom", 5.0, 0.05),
                    ("other", 35.0, 0.35)]
    assert [name for name, _, _ in stage_shares({"update": 4.0}, wall_s=4.0)] == ["update"]


def test_a_corrupt_middle_line_is_skipped_with_a_warning_and_the_rows_after_it_are_kept(tmp_path, caplog):
    from online_dpo.report.view import read_jsonl_tolerant

    path = tmp_path / "train_metrics.jsonl"
    path.write_bytes(b'{"step": 0}\n{"step": 1}\n{"step": 2, "lo\n[3]\n\n{"step": 4}\n\xff\xfe{"step": 5}\n{"step": 6}\n')
    with caplog.at_level("INFO", logger="online_dpo"):
        rows = read_jsonl_tolerant(path)
    assert rows == [{"step": 0}, {"step": 1}, {"step": 4}, {"step": 6}]
    # the torn JSON (line 3), a JSON value that is no row (line 4) and bytes that are not UTF-8
    # (line 7) each warn with the file and line; the blank line 5 is no row and no damage
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 3 and [f"{path}:{n}:" in m for n, m in zip((3, 4, 7), warned)] == [True] * 3, warned
    assert not [r for r in caplog.records if r.levelname == "INFO"]


def test_a_torn_last_line_keeps_the_rows_before_it_and_is_logged_quietly(tmp_path, caplog):
    from online_dpo.report.view import read_jsonl_tolerant

    path = tmp_path / "eval_responses.jsonl"
    path.write_text('{"prompt_id": "a", "text": "é"}\n{"prompt_id": "b", "text": "ok"}\n{"prompt_id": "c", "te')
    with caplog.at_level("INFO", logger="online_dpo"):
        rows = read_jsonl_tolerant(path)
    assert [row["prompt_id"] for row in rows] == ["a", "b"]
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", f"{path}:3: skipped an incomplete last line")]
    # torn inside a multi-byte character: the same, not a decoding error for the whole file
    path.write_bytes('{"prompt_id": "a"}\n{"prompt_id": "b", "text": "é"}'.encode()[:-3])
    assert [row["prompt_id"] for row in read_jsonl_tolerant(path)] == ["a"]
    assert read_jsonl_tolerant(tmp_path / "absent.jsonl") == []
