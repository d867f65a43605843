"""`online-dpo compare`: the schedules' budgets, and tiny end-to-end runs (HF backend) that
check the two identities the comparison rests on: semi-online with one sync over all the steps
is the offline run, and iterative is a plain `run` of the same config; then the head to head."""

import json
from pathlib import Path

import pytest

from online_dpo.compare import Schedule, paired_difference_interval, plan
from online_dpo.config import ConfigError, load_config
from tests.conftest import run_python


def test_every_schedule_gets_the_same_prompts_judge_calls_and_steps():
    cfg = load_config("configs/quickstart.yaml", ["rounds=3", "data.train_prompts_per_round=24", "dpo.max_steps=12"])
    budget, schedules = plan(cfg, ["offline", "iterative", "semi-online"], sync_every=6)
    assert (budget.prompts, budget.judge_calls, budget.steps) == (72, 72 * cfg.generation.samples_per_prompt, 36)
    by_name = {s.name: s for s in schedules}
    assert by_name["offline"] == Schedule("offline", 1, 72, 36, continuous=False)
    assert by_name["iterative"] == Schedule("iterative", 3, 24, 12, continuous=False)
    assert by_name["semi-online-s6"] == Schedule("semi-online-s6", 6, 12, 6, continuous=True)
    for s in schedules:
        assert s.rounds * s.prompts_per_round == 72 and s.rounds * s.steps_per_round == 36
    assert "dpo.optimizer_state=carry" in by_name["semi-online-s6"].overrides()
    assert "dpo.lr_schedule_span=campaign" in by_name["semi-online-s6"].overrides()
    assert not any("carry" in o for o in by_name["iterative"].overrides())
    # one sync over all the steps: the same overrides as offline, so the same run
    (whole,) = plan(cfg, ["semi-online"], sync_every=36)[1]
    assert whole.overrides() == by_name["offline"].overrides()


def test_steps_per_round_without_max_steps_is_what_a_full_round_of_pairs_takes():
    cfg = load_config("configs/quickstart.yaml", ["dpo.max_steps=-1", "dpo.epochs=2", "dpo.batch_size=4",
                                                  "data.train_prompts_per_round=24", "rounds=3"])
    budget, (iterative,) = plan(cfg, ["iterative"])
    assert iterative.steps_per_round == 12 and budget.steps == 36


def test_bad_schedules_get_clear_errors():
    cfg = load_config("configs/quickstart.yaml", ["rounds=3", "data.train_prompts_per_round=24", "dpo.max_steps=12"])
    with pytest.raises(ConfigError, match="unknown schedule 'online'; available: offline, iterative, semi-online"):
        plan(cfg, ["online"])
    with pytest.raises(ConfigError, match=r"--sync-every must be one of \[1, 2, 3, 4, 6, 9, 12, 18, 36\]"):
        plan(cfg, ["semi-online"], sync_every=5)
    with pytest.raises(ConfigError, match="eval.enabled"):
        plan(load_config("configs/quickstart.yaml", ["eval.enabled=false"]), ["offline"])


def test_paired_difference_interval_covers_the_difference_and_shrinks_with_agreement():
    a = [1.0] * 60 + [0.0] * 40
    b = [1.0] * 50 + [0.0] * 50
    low, high = paired_difference_interval(a, b)
    assert low < 0.10 < high and low > 0  # a is right wherever b is, and on 10 more prompts
    low2, high2 = paired_difference_interval(a, list(reversed(a)))
    assert low2 < 0 < high2


TINY = ["generation.backend=hf", "rounds=2", "data.train_prompts_per_round=4", "generation.samples_per_prompt=3",
        "generation.max_new_tokens=10", "eval.max_new_tokens=8", "data.eval_prompts=6", "dpo.batch_size=2",
        "dpo.max_steps=2", "dpo.learning_rate=1e-4", "dpo.mixed_precision=no", "eval.diversity_prompts=0",
        "save_checkpoints=last",
        # length scores make pairs from any candidates of different lengths, so every round trains
        "judge.name=length", "judge.options={max_chars: 12, slack: 200}"]


@pytest.fixture(scope="module")
def compared(module_tmp, shallow_model_path):
    out = module_tmp / "runs"
    tiny = [*TINY, f"policy.model={shallow_model_path}"]  # the identities hold for any policy
    proc = run_python(["-m", "online_dpo.cli", "compare", "configs/quickstart.yaml", f"output_dir={out}", "name=tiny",
                       *tiny, "--sync-every", "4"], timeout=1200)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    plain = run_python(["-m", "online_dpo.cli", "run", "configs/quickstart.yaml", f"output_dir={out}", "name=plain",
                        *tiny], timeout=600)
    assert plain.returncode == 0, plain.stderr[-5000:]
    return out, proc


TIMES = ("timings", "wall_s", "train_tokens_per_s")  # wall-clock measurements, different in every run


def without_times(obj):
    if isinstance(obj, dict):
        return {k: without_times(v) for k, v in obj.items() if k not in TIMES}
    if isinstance(obj, list):
        return [without_times(v) for v in obj]
    return obj


def run_files(root: Path) -> dict:
    """Every data file of a run, wall times taken out (not the manifest's timestamps or the config's names)."""
    out = {}
    for p in sorted(root.rglob("*")):
        name = str(p.relative_to(root))
        if not p.is_file() or p.name in ("manifest.json", "config.yaml") or "/." in f"/{name}":
            continue
        if p.name in ("eval.json", "summary.json"):
            out[name] = without_times(json.loads(p.read_text()))
        elif p.name == "train_metrics.jsonl":
            out[name] = [without_times(json.loads(line)) for line in p.read_text().splitlines()]
        else:
            out[name] = p.read_bytes()
    return out


def test_iterative_is_exactly_a_plain_run_of_the_same_config(compared):
    out, _ = compared
    iterative, plain = run_files(out / "tiny-compare" / "iterative"), run_files(out / "plain")
    assert "round_001/checkpoint/model.safetensors" in plain and "round_001/pairs/data-00000-of-00001.arrow" in plain
    assert iterative.keys() == plain.keys()
    assert [k for k in plain if iterative[k] != plain[k]] == []


def test_semi_online_with_one_sync_over_all_steps_is_exactly_offline(compared):
    out, _ = compared
    root = out / "tiny-compare"
    offline, semi = run_files(root / "offline"), run_files(root / "semi-online-s4")
    assert offline.keys() == semi.keys() and "round_000/checkpoint/model.safetensors" in offline
    assert [k for k in offline if offline[k] != semi[k]] == []
    assert len(offline["round_000/train_metrics.jsonl"]) == 4  # rounds x dpo.max_steps of the iterative config


def test_head_to_head_and_matched_budget_on_tiny_runs(compared):
    out, proc = compared
    result = json.loads((out / "tiny-compare" / "compare.json").read_text())
    assert result["matched"] and result["budget"] == {"prompts": 8, "judge_calls": 24, "steps": 4}
    for name in ("offline", "iterative", "semi-online-s4"):
        assert (result["spent"][name]["prompts"], result["spent"][name]["judge_calls"], result["spent"][name]["steps"]) \
            == (8, 24, 4)
        final = result["schedules"][name]["final"]
        assert final["n"] == 6 and final["ci_low"] <= final["accuracy"] <= final["ci_high"]
    assert [(r["a"], r["b"]) for r in result["head_to_head"]] == [
        ("iterative", "offline"), ("semi-online-s4", "offline"), ("semi-online-s4", "iterative")]
    for row in result["head_to_head"]:
        assert row["wins"] + row["losses"] + row["ties"] + row["errors"] == 6
        low, high = row["accuracy_difference_ci"]
        assert low <= row["accuracy_difference"] <= high
    same = result["head_to_head"][1]  # offline's identical twin vs offline: every verdict a tie
    assert same["ties"] == 6 and same["win_rate"] == 0.5 and same["accuracy_difference"] == 0
    assert (out / "tiny-compare" / "compare.png").stat().st_size > 0
    assert "head to head" in proc.stdout and "matched" in proc.stdout
