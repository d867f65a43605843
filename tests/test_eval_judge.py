"""An eval judge apart from the training judge (eval.judge): the held-out win rates and the
pass rate come from it, the training judge still ranks the candidates, and the best-policy link
follows the pass rate. A tiny HF-backend campaign on the shallow model, in this process."""

import json

from judges import PairwiseItem, load_judge
from judges.base import as_pairwise
from online_dpo.rundir import read_jsonl
from tests.test_round_guard import TINY

# A pointwise check any text can pass or fail: the answer holds the letter "e".
EVAL_JUDGE = ["eval.judge.name=regex", "eval.judge.options={pattern: e}"]


def test_win_rates_and_the_pass_rate_come_from_the_eval_judge(tmp_path, shallow_model_path):
    from online_dpo.cli import main

    assert main(["run", "configs/quickstart.yaml", f"output_dir={tmp_path}", "name=apart", *TINY, "rounds=1",
                 f"policy.model={shallow_model_path}", *EVAL_JUDGE]) == 0
    root = tmp_path / "apart"
    baseline = [row["text"] for row in read_jsonl(root / "baseline" / "eval_responses.jsonl")]
    check = load_judge("regex", pattern="e")
    for r in (0,):
        record = json.loads((root / f"round_{r:03d}" / "eval.json").read_text())
        ev, texts = record["eval"], [row["text"] for row in read_jsonl(root / f"round_{r:03d}" / "eval_responses.jsonl")]
        passed = ev["pass"]
        assert passed["scorer"] == "regex" and passed["n"] == 6 and passed["errors"] == 0
        assert passed["passed"] == sum("e" in t for t in texts) and passed["pass_rate"] == passed["passed"] / 6
        assert passed["baseline_pass_rate"] == sum("e" in t for t in baseline) / 6
        # every held-out verdict is the eval judge's: the answer with an "e" beats the one without
        expected = [v.winner for v in as_pairwise(check).compare(
            [PairwiseItem("", a, b) for a, b in zip(texts, baseline)])]
        assert [c["winner"] for c in ev["comparisons"]["vs_baseline"]] == expected
    # the training judge (length, as TINY sets it) scored the candidates the pairs were made from
    from datasets import load_from_disk

    from judges import PointwiseItem

    length = load_judge("length", max_chars=12, slack=200)
    pairs = load_from_disk(str(root / "round_000" / "pairs")).to_list()
    assert pairs
    for pair in pairs:
        chosen, rejected = (length.score([PointwiseItem("", pair[k][-1]["content"])])[0].value
                            for k in ("chosen", "rejected"))
        assert (pair["score_chosen"], pair["score_rejected"]) == (chosen, rejected) and chosen > rejected
    summary = json.loads((root / "summary.json").read_text())
    assert summary["baseline_pass"]["scorer"] == "regex"
    rates = {res["round"]: res["eval"]["pass"]["pass_rate"] for res in summary["rounds"]}
    best = summary["best_round"]
    assert best is None and max(rates.values()) <= summary["baseline_pass"]["pass_rate"] or \
        best is not None and rates[best] == max(rates.values()) > summary["baseline_pass"]["pass_rate"]
