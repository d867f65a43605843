"""A two-round campaign with real vLLM generation, end to end through the command line, and the
artifacts a user (and TRL) would read afterwards. What it checks holds for any policy: the stages'
records, the artifacts' layout, the resolved settings, and vLLM's log-probs against a float32
pass of the same weights. So the policy is the shallow model (tests/conftest.py), its candidates
ranked by length; the embedded model's own log-probs in vLLM are checked in test_weight_sync."""

import json

import pytest
import yaml

from tests.conftest import BY_LENGTH, run_python

pytestmark = pytest.mark.vllm

OVERRIDES = [
    "rounds=2", "name=two-rounds", "data.train_prompts_per_round=6", "data.eval_prompts=24",
    "generation.samples_per_prompt=4", "generation.max_new_tokens=24", "eval.max_new_tokens=24",
    "dpo.epochs=1", "dpo.max_steps=-1", "dpo.batch_size=4", "save_checkpoints=last", "eval.diversity_prompts=6",
    # Pinned to the float32 path on every machine: the tests below compare vLLM's log-probs with a
    # float32 forward pass, and reference_logps=auto takes them from generation only in float32.
    # On a CPU with native bf16 `auto` would pick bf16 for both; tests/test_precision.py covers that.
    "dpo.mixed_precision=no", "generation.dtype=float32",
]


@pytest.fixture(scope="module")
def finished_run(module_tmp, shallow_model_path):
    out = module_tmp / "runs"
    proc = run_python(["-m", "online_dpo.cli", "run", "configs/quickstart.yaml", f"output_dir={out}", *OVERRIDES,
                       f"policy.model={shallow_model_path}", *BY_LENGTH], timeout=900)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    return out / "two-rounds", proc


def test_every_stage_of_both_rounds_is_recorded(finished_run):
    root, proc = finished_run
    manifest = json.loads((root / "manifest.json").read_text())
    for r in ("0", "1"):
        assert {"generate", "judge", "pairs", "checkpoint", "eval"} <= set(manifest["rounds"][r])
    assert manifest["versions"]["torch"].startswith("2.")
    assert "win rate" in proc.stdout  # the per-round table was printed


def test_the_run_ends_with_where_its_time_went(finished_run):
    """One line per stage with its seconds and share of the run's wall time, which add up to it."""
    import re

    _, proc = finished_run
    head, lines = proc.stdout.split("where the time went (", 1)[1].split("\n", 1)
    wall = float(re.match(r"(\d+) s in all, this run\):", head).group(1))
    rows = re.findall(r"^  (\S+(?: \S+)?) +([0-9.]+) s +([0-9.]+)%$", lines, re.M)
    names = [name for name, _, _ in rows]
    assert names[:3] == ["setup", "baseline eval", "generate"] and {"judge", "update", "eval"} <= set(names)
    assert abs(sum(float(t) for _, t, _ in rows) - wall) <= 1 and abs(sum(float(x) for _, _, x in rows) - 100) < 0.5


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
    # the last round keeps its checkpoint; earlier ones are pruned (save_checkpoints=last) but the best round's
    best = json.loads((root / "summary.json").read_text())["best_round"]
    assert (root / "round_001" / "checkpoint" / "model.safetensors").exists()
    assert (root / "round_000" / "checkpoint").exists() == (best == 0)
    if best is not None:
        assert (root / "best").resolve() == (root / f"round_{best:03d}" / "checkpoint").resolve()
    eval_ids = {json.loads(line)["prompt_id"] for line in (root / "baseline" / "eval_responses.jsonl").read_text().splitlines()}
    assert len(eval_ids) == 24 and not eval_ids & (prompts[0] | prompts[1])


def test_resolved_config_is_saved(finished_run):
    root, _ = finished_run
    saved = yaml.safe_load((root / "config.yaml").read_text())
    assert saved["rounds"] == 2 and saved["data"]["train_prompts_per_round"] == 6


def test_every_hardware_auto_is_logged_once_and_recorded_with_its_reason(finished_run):
    from online_dpo.hardware import SETTINGS, Hardware

    root, proc = finished_run
    resolved = json.loads((root / "manifest.json").read_text())["resolved"]
    assert resolved["hardware"]["fast_bf16"] == Hardware.detect().fast_bf16
    assert resolved["mixed_precision"] == {"value": "no", "reason": "set in the config"}
    assert resolved["generation_dtype"]["value"] == "float32"
    assert resolved["reference_logps"]["value"] == "generation" and resolved["reference_logps"]["reason"].startswith("auto")
    assert resolved["kv_cache_gb"]["value"] == "auto" and resolved["vllm_kv_cache_bytes"] > 0
    # the engine runs the blocks resolved for a CPU, short enough for the samples of a prompt to share its prefill
    assert resolved["kv_block_tokens"]["value"] == resolved["vllm_kv_block_tokens"] == 32
    assert resolved["threads"]["value"] >= 1 and resolved["threads"]["reason"]
    for name in SETTINGS:
        assert proc.stderr.count(f"{name} = ") == 1, name  # logged once, at start


def test_diversity_uses_the_policys_own_token_logprobs(finished_run):
    """The diversity watch's entropy is the mean -log p of vLLM's sampled tokens: those log-probs
    must be the round's policy's, so recompute a few with HF on the round-1 checkpoint."""
    import torch

    from online_dpo.config import load_config
    from online_dpo.data import chat_prompt_ids, load_prompts
    from online_dpo.engines.models import load_policy, load_tokenizer

    root, proc = finished_run
    ev = json.loads((root / "round_001" / "eval.json").read_text())["eval"]
    div = ev["diversity"]
    assert (div["prompts"], div["samples_per_prompt"]) == (6, 4) and div["token_entropy"] > 0
    assert "distinct-2" in proc.stdout  # the diversity table was printed after the round table
    rows = [json.loads(line) for line in (root / "round_001" / "diversity_samples.jsonl").read_text().splitlines()]
    assert len(rows) == 24
    cfg = load_config(root / "config.yaml")
    ckpt = str(root / "round_001" / "checkpoint")
    tokenizer, model = load_tokenizer(ckpt), load_policy(ckpt).eval()
    prompts = {p.id: p for p in load_prompts(cfg.data, tokenizer, cfg.policy.max_prompt_tokens).eval}
    for row in rows[:3]:
        prompt_ids = chat_prompt_ids(tokenizer, prompts[row["prompt_id"]].messages)
        ids = torch.tensor([prompt_ids + row["token_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
        hf = logits.log_softmax(-1).gather(1, torch.tensor(row["token_ids"]).unsqueeze(1)).squeeze(1)
        assert len(row["logprobs"]) == len(row["token_ids"])
        assert torch.allclose(hf, torch.tensor(row["logprobs"]), atol=2e-2), (hf, row["logprobs"])


def test_the_reference_comes_from_generation_and_equals_a_forward_pass(finished_run, shallow_model_path):
    """vLLM in float32, a float32 update and the refreshed reference: the round's reference
    log-probs are the sums of vLLM's own token log-probs (no reference pass), and must equal
    what a forward pass of the round-start policy (round 0: the initial model) gives."""
    import torch
    from datasets import load_from_disk

    from online_dpo.data import chat_prompt_ids
    from online_dpo.engines.models import load_policy, load_tokenizer

    root, proc = finished_run
    assert "reference log-probs: generation (dpo.reference_logps=auto)" in proc.stderr
    rdir = root / "round_000"
    pairs = {(p["prompt_id"], p["chosen_index"], p["rejected_index"]): p for p in load_from_disk(str(rdir / "pairs"))}
    rows = [json.loads(line) for line in (rdir / "reference_logps.jsonl").read_text().splitlines()]
    assert len(rows) == len(pairs) > 0
    tokenizer, model = load_tokenizer(shallow_model_path), load_policy(shallow_model_path).eval()
    gaps = []
    for row in rows[:3]:
        pair = pairs[(row["prompt_id"], row["chosen_index"], row["rejected_index"])]
        prompt_ids = chat_prompt_ids(tokenizer, pair["prompt"])
        for side in ("chosen", "rejected"):
            ids, logprobs = pair[f"{side}_token_ids"], pair[f"{side}_token_logprobs"]
            assert len(logprobs) == len(ids) > 0
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt_ids + ids])).logits[0, len(prompt_ids) - 1 : -1].float()
            forward = logits.log_softmax(-1).gather(1, torch.tensor(ids).unsqueeze(1)).sum().item()
            assert row[f"ref_{side}"] == pytest.approx(sum(logprobs), abs=1e-4)  # what was trained against
            gaps.append(abs(forward - row[f"ref_{side}"]))
    print(f"max |forward - generation| over {len(gaps)} responses: {max(gaps):.2e}")
    assert max(gaps) < 1e-3  # vLLM and torch float32 kernels agree closely
