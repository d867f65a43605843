"""The local LLM-as-judge through vLLM in-process, with the embedded model."""

import pytest

from tests.conftest import last_json_line, run_python

pytestmark = pytest.mark.vllm


def test_vllm_judge_runs_both_orders_and_counts_everything(embedded_model_path):
    proc = run_python(["tests/vllm_judge_probe.py"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = last_json_line(proc.stdout)
    print(r)
    stats = r["stats"]
    assert stats["requests"] == 8 and stats["completion_tokens"] == 8 and stats["prompt_tokens"] > 8 * 50
    assert stats["cost"] == 0.0
    assert len(r["verdicts"]) == 4
    for winner, prob_a, error in r["verdicts"]:
        assert (winner is None) == (error is not None)  # an error is never a win or a loss
    # every pair ends as consistent, inconsistent (-> tie) or an error; none is silently lost
    assert stats["consistent"] + stats["inconsistent"] + sum(1 for w, _, _ in r["verdicts"] if w is None) == 4
    assert set(r["templates"]) == {"pairwise", "pairwise_reference"}
    assert r["kv_block_tokens"] == 32  # on a CPU: the requests share their template's prefill
