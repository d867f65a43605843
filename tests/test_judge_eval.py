import json

from tests.conftest import ROOT, run_python
from tests.fake_openai_server import FakeOpenAI

PAIRS = str(ROOT / "tests" / "data" / "labelled_arithmetic.jsonl")


def test_judge_eval_with_a_verifier(tmp_path):
    out = tmp_path / "result.json"
    proc = run_python(["-m", "online_dpo.cli", "judge-eval", PAIRS, "--judge", "arithmetic", "--out", str(out)], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    # 10 pairs; the last has no reference, so the verifier reports an error for it
    assert r["pairs"] == 10 and r["error_rate"] == 0.1
    assert r["agreement"] == 1.0 and r["decisive_agreement"] == 1.0 and r["tie_rate"] == 0.1


def test_judge_eval_reports_position_bias_of_an_api_judge(tmp_path):
    with FakeOpenAI("always_a") as server:
        proc = run_python(["-m", "online_dpo.cli", "judge-eval", PAIRS, "--judge", "openai", "model=fake",
                           f"base_url={server.base_url}", "api_key_env=null", f"cache_path={tmp_path / 'c.sqlite'}",
                           "price_per_million_input=1.0"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert r["position_consistency"] == 0.0 and r["tie_rate"] == 1.0  # every verdict flipped with the order
    assert r["requests"] == 20 and r["cost"] > 0
    assert r["decisive_agreement"] == 0.5  # ties count half: no better than chance, never "A wins"


def test_judge_eval_bad_input_is_clear(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "response_a": "x"}\n')
    proc = run_python(["-m", "online_dpo.cli", "judge-eval", str(bad), "--judge", "arithmetic"], timeout=120)
    assert proc.returncode == 2 and "bad.jsonl:1" in proc.stderr and "label" in proc.stderr


def test_judge_eval_against_a_second_server_under_the_same_model_name_asks_that_server(tmp_path, capsys):
    """A server whose verdicts hold in both orders, then a position-biased one under the same model
    name and cache: the second answered from the first's cache once (0 requests); each server now
    judges for itself."""
    from online_dpo.cli import main

    results = []
    for behaviour in ("consistent", "always_a"):
        with FakeOpenAI(behaviour) as server:
            assert main(["judge-eval", PAIRS, "--judge", "openai", "model=judge", f"base_url={server.base_url}",
                         "api_key_env=null", f"cache_path={tmp_path / 'c.sqlite'}"]) == 0
            out = capsys.readouterr().out
            results.append((json.loads(out[out.index("{"):]), len(server.requests)))
    (truthful, asked_first), (biased, asked_second) = results
    assert asked_first == asked_second == 20 and biased["requests"] == 20
    assert biased["position_consistency"] == 0.0 and truthful["position_consistency"] == 1.0
