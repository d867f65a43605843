"""The API judge against a real OpenAI-compatible server: vLLM's own, started here on localhost
with the embedded model by `online-dpo serve`'s launcher (the happy path; fault paths are in
*_faults.py)."""

import json

import pytest

from judges import PairwiseItem, load_judge
from judges.base import IDENTICAL
from online_dpo.rundir import read_parquet
from tests.conftest import free_port, run_python

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def vllm_server(embedded_model_path, tmp_path_factory):
    from online_dpo.engines.serve import start_server, stop_server, wait_ready
    from online_dpo.errors import GenerationServerError

    log_path = tmp_path_factory.mktemp("server") / "vllm.log"
    with open(log_path, "w") as log:
        proc, url = start_server(embedded_model_path, log_file=log, port=free_port(), dtype="float32",
                                 max_model_len=1024, extra=["--served-model-name", "judge"])
    try:
        wait_ready(url, proc, timeout_s=400)
    except GenerationServerError as e:
        stop_server(proc)
        pytest.fail(f"vLLM server did not come up: {e}\n{log_path.read_text()[-4000:]}")
    yield f"{url}/v1"
    stop_server(proc)


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
    """A campaign round judged through the real server, every request counted. The judge is asked
    in one order (the round robin alternates which candidate is shown first): the embedded 135M
    model is a judge in name only, and asked in both orders it tends to name the same position both
    times, so every verdict is a tie and the round stops (test_noisy_api_judge checks that stop)."""
    run_dir = tmp_path / "api-judge"
    proc = run_python(["-m", "online_dpo.cli", "run", "configs/local_vllm_judge.yaml", f"output_dir={tmp_path}",
                       "name=api-judge", f"judge.options.base_url={vllm_server}",
                       f"judge.options.cache_path={tmp_path / 'judge.sqlite'}", "judge.options.both_orders=false",
                       "rounds=1", "data.train_prompts_per_round=4", "generation.samples_per_prompt=4",
                       "dpo.max_steps=2", "data.eval_prompts=8", "generation.max_new_tokens=16",
                       "eval.max_new_tokens=16",
                       "eval.diversity_prompts=0",  # the policy's diversity watch is not what this tests (test_campaign)
                       # the judge on the server is the embedded model; the policy it judges can be any (conftest)
                       f"policy.model={shallow_model_path}"], timeout=900)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-5000:])

    result = json.loads((run_dir / "round_000" / "eval.json").read_text())
    stats = result["judge_stats"]
    # 4 prompts x C(4,2) round-robin games and 8 eval comparisons, each asked once, less the
    # comparisons of two identical responses (ties that ask nothing)
    games = read_parquet(run_dir / "round_000" / "comparisons.parquet")
    assert all(g["position_consistent"] is None for g in games)  # no game asked in both orders
    texts = {}
    for row in read_parquet(run_dir / "round_000" / "candidates.parquet"):
        texts.setdefault(row["prompt_id"], []).append(row["text"])
    identical = sum(a == b for t in texts.values() for k, a in enumerate(t) for b in t[k + 1:])
    identical_eval = sum(c["rationale"] == IDENTICAL for c in result["eval"]["comparisons"]["vs_baseline"])
    assert stats["requests"] == 4 * 6 - identical + 8 - identical_eval and stats["cache_hits"] == 0
    base = result["eval"]["vs_baseline"]
    assert base["n"] == 8 and base["errors"] + base["wins"] + base["losses"] + base["ties"] == 8
    quality = result["judge_quality"]
    assert quality["comparisons"] == 24 and quality["position_consistency"] is None
    funnel = result["funnel"]
    assert funnel["prompts_paired"] + sum(funnel["dropped"].values()) == 4
