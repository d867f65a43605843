"""Two small end-to-end campaigns (HF generation backend) that exercise the campaign options,
each checked against numbers recomputed here (on the embedded model's first layers, the
conftest's shallow model: which policy is the reference holds for any policy):

- from a Parquet file of chat-format prompts, with replay (pairs.replay_fraction) and the
  default refreshed reference: round 1's reference log-probs are those of the round-0
  checkpoint, and its update trained on its fresh pairs plus a draw of round 0's;
- from a JSONL file of plain prompts, with LoRA, the initial-model reference, a carried-over
  optimizer, a cosine LR schedule and gradient checkpointing: round 1's reference
  log-probs are those of the initial model.
"""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from online_dpo.config import DPOConfig
from online_dpo.data import chat_prompt_ids
from online_dpo.pairs import replay_count
from online_dpo.train.logps import batch_logps
from online_dpo.train.packing import collate_pairs, encode_pair, make_example_batches
from tests.conftest import BY_LENGTH, run_python

SMALL = ["rounds=2", "generation.backend=hf", "data.train_prompts_per_round=4", "generation.samples_per_prompt=3",
         "generation.max_new_tokens=12", "eval.max_new_tokens=8", "data.eval_prompts=2", "dpo.batch_size=2",
         "dpo.epochs=1", "dpo.max_steps=-1", "dpo.learning_rate=1e-4",
         # These tests are about which policy is the reference, checked against a float32 forward pass
         # here; `auto` would pick bf16 autocast on a CPU with native bf16, whose rounding (0.07-2.5 nats
         # per response) is not what is tested. The bf16 path has its own test: tests/test_precision.py.
         "dpo.mixed_precision=no",
         "eval.diversity_prompts=0",  # the diversity watch is tested by the KTO round below and tests/test_campaign.py
         *BY_LENGTH]


def chat(i):
    return [{"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": f"Name a color, variant {i}."}]


def run_campaign(out: Path, name: str, source: str, model: str, extra: list[str]) -> Path:
    proc = run_python(["-m", "online_dpo.cli", "run", "configs/quickstart.yaml", f"output_dir={out}", f"name={name}",
                       f"data.source={source}", f"policy.model={model}", *SMALL, *extra], timeout=900)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    return out / name


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pairs_of(root: Path, r: int) -> list[dict]:
    from datasets import load_from_disk

    return load_from_disk(str(root / f"round_{r:03d}" / "pairs")).to_list()


def logps_under(model_dir: str, root: Path, rows: list[dict]) -> list[tuple[float, float]]:
    """(chosen, rejected) summed log-probs of the pairs named by `rows` under the model in `model_dir`."""
    from online_dpo.engines.models import load_policy, load_tokenizer

    tokenizer, model = load_tokenizer(model_dir), load_policy(model_dir).eval()
    by_key = {}
    for r in (0, 1):
        for p in pairs_of(root, r):
            by_key[(r, p["prompt_id"], p["chosen_index"], p["rejected_index"])] = p
    out = []
    with torch.no_grad():
        for row in rows:
            r = 1 if row["replay_from_round"] is None else row["replay_from_round"]
            p = by_key[(r, row["prompt_id"], row["chosen_index"], row["rejected_index"])]
            enc = encode_pair(chat_prompt_ids(tokenizer, p["prompt"]), p["chosen_token_ids"],
                                  p["rejected_token_ids"], 192)
            chosen, rejected = batch_logps(model, collate_pairs([enc], tokenizer.pad_token_id))
            out.append((float(chosen), float(rejected)))
    return out


def saved_reference(rows: list[dict]) -> list[tuple[float, float]]:
    return [(row["ref_chosen"], row["ref_rejected"]) for row in rows]


def close(a, b, atol=2e-3) -> bool:
    return torch.allclose(torch.tensor(a), torch.tensor(b), atol=atol, rtol=0)


@pytest.fixture(scope="module")
def parquet_run(module_tmp, shallow_model_path):
    tmp = module_tmp / "parquet"
    tmp.mkdir()
    path = tmp / "chat.parquet"
    pd.DataFrame({"messages": [chat(i) for i in range(12)]}).to_parquet(path)
    root = run_campaign(tmp / "runs", "chat-parquet", str(path), shallow_model_path,
                        ["data.prompt_column=messages", "pairs.replay_fraction=0.5", "save_checkpoints=all"])
    return root, path


@pytest.fixture(scope="module")
def jsonl_run(module_tmp, shallow_model_path):
    tmp = module_tmp / "jsonl"
    tmp.mkdir()
    words = ["cat", "dog", "tree", "sun", "moon", "star", "rain", "fish", "bird", "cake", "cat"]
    src = tmp / "plain.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"Give me a word that rhymes with {w}."}) + "\n" for w in words))
    root = run_campaign(tmp / "runs", "plain-jsonl", str(src), shallow_model_path,
                        ["lora.enabled=true", "lora.r=4", "dpo.reference=initial", "dpo.optimizer_state=carry",
                         "dpo.lr_schedule=cosine", "dpo.warmup_steps=1", "dpo.gradient_checkpointing=true",
                         "dpo.learning_rate=1e-3"])
    return root, words


def test_campaign_from_a_parquet_of_chat_prompts(parquet_run):
    root, path = parquet_run
    report = json.loads((root / "data.json").read_text())
    assert report["source"] == str(path) and report["rows_read"] == 12 and report["eval"] == 2
    for r in (0, 1):
        prompts = read_jsonl(root / f"round_{r:03d}" / "prompts.jsonl")
        assert len(prompts) == 4 and all(p["messages"] in [chat(i) for i in range(12)] for p in prompts)
        manifest = json.loads((root / "manifest.json").read_text())
        assert {"generate", "judge", "pairs", "checkpoint", "eval"} <= set(manifest["rounds"][str(r)])


def test_replay_mixes_earlier_pairs_into_the_update(parquet_run):
    root, _ = parquet_run
    fresh, earlier = pairs_of(root, 1), pairs_of(root, 0)
    assert fresh and earlier, "no pairs formed: the replay check would be empty"
    replayed = read_jsonl(root / "round_001" / "replay.jsonl")
    assert len(replayed) == min(len(earlier), replay_count(len(fresh), 0.5))
    earlier_keys = {(p["prompt_id"], p["chosen_index"], p["rejected_index"]) for p in earlier}
    assert all(row["replay_from_round"] == 0 for row in replayed)
    assert {(row["prompt_id"], row["chosen_index"], row["rejected_index"]) for row in replayed} <= earlier_keys
    # The update scored (and trained on) exactly the fresh pairs plus the replayed ones.
    scored = read_jsonl(root / "round_001" / "reference_logps.jsonl")
    assert sorted(row["replay_from_round"] is not None for row in scored) == \
        sorted([False] * len(fresh) + [True] * len(replayed))
    assert json.loads((root / "round_001" / "funnel.json").read_text())["replayed"] == len(replayed)


def test_refreshed_reference_is_the_previous_rounds_policy(parquet_run, shallow_model_path):
    root, _ = parquet_run
    rows = read_jsonl(root / "round_001" / "reference_logps.jsonl")
    saved = saved_reference(rows)
    assert close(saved, logps_under(str(root / "round_000" / "checkpoint"), root, rows))
    # and not the initial model (round 0's update moved these log-probs measurably)
    assert not close(saved, logps_under(shallow_model_path, root, rows))


def test_campaign_from_a_jsonl_of_plain_prompts(jsonl_run):
    root, words = jsonl_run
    texts = {f"Give me a word that rhymes with {w}." for w in words}
    report = json.loads((root / "data.json").read_text())
    assert report["duplicates_skipped"] == 1 and report["eval"] == 2 and report["train"] == 8
    train_ids = set()
    for r in (0, 1):
        prompts = read_jsonl(root / f"round_{r:03d}" / "prompts.jsonl")
        assert len(prompts) == 4 and all(p["messages"][0]["content"] in texts for p in prompts)
        train_ids |= {p["id"] for p in prompts}
    assert len(train_ids) == 8  # no prompt reused across rounds
    eval_ids = {row["prompt_id"] for row in read_jsonl(root / "baseline" / "eval_responses.jsonl")}
    assert len(eval_ids) == 2 and not eval_ids & train_ids


def test_initial_reference_with_lora_is_the_round0_model(jsonl_run, shallow_model_path):
    root, _ = jsonl_run
    rows = read_jsonl(root / "round_001" / "reference_logps.jsonl")
    assert rows, "no pairs formed in round 1"
    saved = saved_reference(rows)
    assert close(saved, logps_under(shallow_model_path, root, rows))
    # the policy did move: the round-1 checkpoint (merged LoRA) scores these pairs differently
    assert not close(saved, logps_under(str(root / "round_001" / "checkpoint"), root, rows))


def test_lora_checkpoint_optimizer_and_schedule(jsonl_run):
    root, _ = jsonl_run
    ckpt = root / "round_001" / "checkpoint"
    assert (ckpt / "adapter" / "adapter_config.json").exists() and (ckpt / "optimizer.pt").exists()
    assert (ckpt / "model.safetensors").exists() and (ckpt / "config.json").exists()
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    steps = [float(s["step"]) for s in state["state"].values()]
    metrics = [read_jsonl(root / f"round_{r:03d}" / "train_metrics.jsonl") for r in (0, 1)]
    # carried over: the AdamW step count spans both rounds' updates
    assert steps and max(steps) == len(metrics[0]) + len(metrics[1])
    for m in metrics:
        assert m[0]["lr"] == 0.0  # warmup from 0 (transformers' schedule)
        if len(m) > 2:
            assert m[-1]["lr"] < m[1]["lr"]  # cosine decay after warmup
        assert all("kl" in step and "chosen_reward" in step for step in m)


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_reference_free_losses_run_a_round_without_a_reference_pass(tmp_path, loss, shallow_model_path):
    words = ["cat", "dog", "tree", "sun", "moon", "star", "rain", "fish"]
    src = tmp_path / "plain.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"Give me a word that rhymes with {w}."}) + "\n" for w in words))
    root = run_campaign(tmp_path / "runs", loss, str(src), shallow_model_path,
                        ["rounds=1", f"dpo.loss={loss}", "dpo.beta=2.0"])
    result = json.loads((root / "round_000" / "eval.json").read_text())
    steps = read_jsonl(root / "round_000" / "train_metrics.jsonl")
    assert result["pairs"] > 0 and steps, "no pairs formed: nothing was trained"
    assert "reference" not in result["timings"] and "update" in result["timings"]
    assert not (root / "round_000" / "reference_logps.jsonl").exists()
    assert all("kl" not in s and s["loss"] > 0 for s in steps)  # no reference, so no KL to it
    assert (root / "round_000" / "checkpoint" / "model.safetensors").exists()


def test_kto_round_of_the_quickstart_labels_every_candidate_by_the_verifier(tmp_path):
    """dpo.loss=kto on the quickstart (arithmetic verifier, a pointwise judge): every judged
    candidate becomes an example labelled by the threshold, the reference pass scores each
    example under the initial model, and the eval measures diversity next to the initial policy's."""
    import pandas as pd
    from datasets import load_from_disk

    from judges.models import resolve_model_path
    from online_dpo.engines.models import load_policy, load_tokenizer

    out = tmp_path / "runs"
    proc = run_python(["-m", "online_dpo.cli", "run", "configs/quickstart.yaml", f"output_dir={out}", "name=kto",
                       "rounds=1", "generation.backend=hf", "data.train_prompts_per_round=4",
                       "generation.samples_per_prompt=4", "generation.max_new_tokens=12", "eval.max_new_tokens=8",
                       "data.eval_prompts=3", "dpo.loss=kto", "dpo.batch_size=4", "dpo.max_steps=-1", "dpo.learning_rate=1e-4",
                       "dpo.mixed_precision=no",  # its reference is checked against a float32 pass (see SMALL)
                       "eval.diversity_prompts=2", "eval.diversity_samples=3"], timeout=900)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])
    root, rdir = out / "kto", out / "kto" / "round_000"
    judged = pd.read_parquet(rdir / "judgments.parquet")
    examples = load_from_disk(str(rdir / "examples")).to_list()
    assert not (rdir / "pairs").exists()
    # every candidate the verifier scored is an example, labelled by score >= kto.threshold (0.5)
    expected = {(j.prompt_id, j.index): j.score >= 0.5 for j in judged.itertuples() if j.error is None}
    assert {(e["prompt_id"], e["index"]): e["label"] for e in examples} == expected and len(expected) == 16
    funnel = json.loads((rdir / "funnel.json").read_text())
    assert funnel["examples"] == 16 and funnel["desirable"] == sum(expected.values())
    result = json.loads((rdir / "eval.json").read_text())
    assert result["examples"] == 16 and "pairs" not in result and "reference" in result["timings"]

    # the reference pass of round 0 scored each example under the initial model (refreshed reference)
    rows = read_jsonl(rdir / "reference_logps.jsonl")
    assert sorted((r["prompt_id"], r["index"]) for r in rows) == sorted(expected)
    model_dir = str(resolve_model_path("embedded"))
    tokenizer, model = load_tokenizer(model_dir), load_policy(model_dir).eval()
    by_key = {(e["prompt_id"], e["index"]): e for e in examples}
    for row in rows[:3]:
        e = by_key[(row["prompt_id"], row["index"])]
        batch = make_example_batches([e], {e["prompt_id"]: chat_prompt_ids(tokenizer, e["prompt"])},
                                         batch_size=1, max_length=DPOConfig().max_length, pad_id=tokenizer.pad_token_id,
                                         seed=0)[0][0]
        with torch.no_grad():
            (logp,) = batch_logps(model, batch)
        assert row["ref_logp"] == pytest.approx(float(logp), abs=2e-3) and row["label"] == e["label"]

    steps = read_jsonl(rdir / "train_metrics.jsonl")
    epochs = yaml.safe_load((root / "config.yaml").read_text())["dpo"]["epochs"]
    assert len(steps) == 4 * epochs  # 16 examples in batches of 4, per epoch
    assert all({"desirable_reward", "undesirable_reward", "kl", "kto_z0"} <= set(s) for s in steps)
    assert steps[0]["kl"] == pytest.approx(0, abs=1e-3)  # the policy is its reference before the first step

    # the diversity watch: the initial policy's and round 0's, from 2 prompts x 3 samples each
    manifest = json.loads((root / "manifest.json").read_text())
    base = manifest["rounds"]["baseline"]["diversity"]["metrics"]
    div = result["eval"]["diversity"]
    for d in (base, div):
        assert (d["prompts"], d["samples_per_prompt"]) == (2, 3)
        assert 0 < d["distinct_1"] <= 1 and 0 <= d["pairwise_overlap"] <= 1 and d["token_entropy"] > 0
    samples = read_jsonl(rdir / "diversity_samples.jsonl")
    assert len(samples) == 6 and all(len(s["logprobs"]) >= 1 and max(s["logprobs"]) <= 0 for s in samples)
    assert isinstance(result["eval"]["diversity_warnings"], list)
    report = run_python(["-m", "online_dpo.cli", "report", str(root)], timeout=300)
    assert report.returncode == 0 and "16 ex" in report.stdout and "distinct-2" in report.stdout, report.stdout[-3000:]
