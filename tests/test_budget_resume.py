"""A judge budget stops a campaign cleanly (no invented verdicts), and `resume` with a
larger budget finishes it without sending any request twice. Uses the HF `generate`
backend (no vLLM) and the local fake OpenAI server."""

import json
from collections import Counter

from judges.base import IDENTICAL
from online_dpo.rundir import read_parquet
from tests.conftest import run_python
from tests.fake_openai_server import FakeOpenAI

TINY = ["rounds=1", "name=budget", "generation.backend=hf", "data.train_prompts_per_round=2",
        "generation.samples_per_prompt=2", "generation.max_new_tokens=8", "eval.max_new_tokens=8",
        "data.eval_prompts=3", "dpo.batch_size=2", "dpo.max_steps=2",
        "eval.diversity_prompts=0"]  # the judge's budget is what this tests; the diversity watch: test_campaign


def test_budget_stop_then_resume_pays_once(tmp_path, shallow_model_path):
    env = {"FAKE_JUDGE_KEY": "sk-test-Zq9xK2vLw7-456"}
    # A judge that prefers one of any two different responses: the round has something to train on
    # (a judge whose every verdict is a tie stops the round: tests/test_noisy_api_judge.py).
    with FakeOpenAI("consistent") as server:
        judge = ["judge.name=openai", "judge.options.model=fake", f"judge.options.base_url={server.base_url}",
                 "judge.options.api_key_env=FAKE_JUDGE_KEY", f"judge.options.cache_path={tmp_path / 'cache.sqlite'}",
                 "judge.options.max_concurrency=1"]
        first = run_python(["-m", "online_dpo.cli", "run", "configs/quickstart.yaml", f"output_dir={tmp_path}",
                            *TINY, *judge, "judge.options.max_calls=1",
                            f"policy.model={shallow_model_path}"],  # the budget holds whatever the policy answers
                           timeout=600, env=env)
        assert first.returncode == 3, (first.stdout[-2000:], first.stderr[-4000:])
        assert "judge budget reached" in first.stderr and "resume" in first.stderr
        run_dir = tmp_path / "budget"
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert "generate" in manifest["rounds"]["0"] and "judge" not in manifest["rounds"]["0"]
        assert len(server.requests) == 1  # the budget, and not one request more

        second = run_python(["-m", "online_dpo.cli", "resume", str(run_dir), "judge.options.max_calls=100"],
                            timeout=600, env=env)
        assert second.returncode == 0, (second.stdout[-2000:], second.stderr[-4000:])
        prompts = Counter(r["body"]["messages"][0]["content"] for r in server.requests)

    # 2 prompts x 1 round-robin comparison of their 2 candidates x 2 orders, + 3 eval comparisons x 2 orders,
    # less the comparisons of identical responses (ties that ask nothing); nothing sent twice (the one
    # reply paid before the stop came from the cache)
    ev = json.loads((run_dir / "round_000" / "eval.json").read_text())
    texts = {}
    for row in read_parquet(run_dir / "round_000" / "candidates.parquet"):
        texts.setdefault(row["prompt_id"], []).append(row["text"])
    identical = sum(len(set(t)) == 1 for t in texts.values())
    identical += sum(c["rationale"] == IDENTICAL for c in ev["eval"]["comparisons"]["vs_baseline"])
    asked = 2 * (2 + 3 - identical)
    assert identical < 5 and len(server.requests) == asked and max(prompts.values()) == 1
    assert ev["judge_stats"]["cache_hits"] == 1 and ev["judge_stats"]["requests"] == asked - 1
    assert set(ev["judge_templates"]) == {"pairwise", "pairwise_reference"}
    for path in run_dir.rglob("*"):  # the key never reaches the run directory
        if path.is_file() and path.suffix in (".json", ".yaml", ".jsonl", ".txt"):
            assert "Zq9xK2vLw7" not in path.read_text()
