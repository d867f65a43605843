"""A two-round campaign on the embedded model with real vLLM generation, end to end
through the command line, and the artifacts a user (and TRL) would read afterwards."""

import json

import pytest
import yaml

from tests.conftest import run_python

pytestmark = pytest.mark.vllm

OVERRIDES = [
    "rounds=2", "name=two-rounds", "data.train_prompts_per_round=6", "data.eval_prompts=24",
    "generation.samples_per_prompt=4", "generation.max_new_tokens=24", "eval.max_new_tokens=24",
    "dpo.epochs=1", "dpo.batch_size=4", "save_checkpoints=last",
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    proc = run_python(["-m", "online_dpo.cli", "run", "configs/quickstart.yaml", f"output_dir={out}", *OVERRIDES],
                      timeout=900)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    return out / "two-rounds", proc


def test_every_stage_of_both_rounds_is_recorded(finished_run):
    root, proc = finished_run
    manifest = json.loads((root / "manifest.json").read_text())
    for r in ("0", "1"):
        assert {"generate", "judge", "pairs", "checkpoint", "eval"} <= set(manifest["rounds"][r])
    assert manifest["versions"]["torch"].startswith("2.")
    assert "win rate" in proc.stdout  # the per-round table was printed


def test_artifacts_per_round(finished_run):
    from datasets import load_from_disk

    root, _ = finished_run
    prompts = {}
    for r in (0, 1):
        rdir = root / f"round_{r:03d}"
        prompts[r] = {json.loads(line)["id"] for line in (rdir / "prompts.jsonl").read_text().splitlines()}
        assert len(prompts[r]) == 6
        assert (rdir / "candidates.parquet").stat().st_size > 0
        assert (rdir / "judgments.parquet").stat().st_size > 0
        pairs = load_from_disk(str(rdir / "pairs"))
        assert {"prompt", "chosen", "rejected", "margin"} <= set(pairs.column_names)
        funnel = json.loads((rdir / "funnel.json").read_text())
        assert funnel["candidates"] == 24 and funnel["pairs"] == len(pairs)
        for row in pairs:  # conversational format TRL's DPOTrainer reads
            assert row["prompt"][0]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
            assert row["score_chosen"] > row["score_rejected"]
        ev = json.loads((rdir / "eval.json").read_text())["eval"]
        base = ev["vs_baseline"]
        assert base["n"] == 24 and base["wins"] + base["losses"] + base["ties"] + base["errors"] == 24
        assert 0.0 <= base["win_rate"] <= 1.0 and base["ci_low"] <= base["win_rate"] <= base["ci_high"]
        assert 0.0 <= ev["accuracy"] <= 1.0
        assert ("vs_previous" in ev) == (r == 1)
    assert not prompts[0] & prompts[1], "a train prompt was reused across rounds"
    # the last round keeps its checkpoint, earlier ones are pruned (save_checkpoints=last)
    assert (root / "round_001" / "checkpoint" / "model.safetensors").exists()
    assert not (root / "round_000" / "checkpoint").exists()
    eval_ids = {json.loads(line)["prompt_id"] for line in (root / "baseline" / "eval_responses.jsonl").read_text().splitlines()}
    assert len(eval_ids) == 24 and not eval_ids & (prompts[0] | prompts[1])


def test_resolved_config_is_saved(finished_run):
    root, _ = finished_run
    saved = yaml.safe_load((root / "config.yaml").read_text())
    assert saved["rounds"] == 2 and saved["data"]["train_prompts_per_round"] == 6
