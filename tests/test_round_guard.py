"""The round guard (guard.on_loss): the rule on hand-made evals, the best round, and tiny
campaigns (HF backend, in this process, on the conftest's shallow model: the guard's rule is made
to reject, so what the policy answers does not matter) whose round is rejected: rolled back and
retried on fresh prompts, or the campaign stops, and a resume agrees with what ran."""

import itertools
import json
from pathlib import Path

import torch

from online_dpo.data import chat_prompt_ids
from online_dpo.campaign import guard_verdict
from online_dpo.report.view import best_round
from online_dpo.rundir import read_jsonl
from online_dpo.train.logps import batch_logps
from online_dpo.train.packing import collate_pairs, encode_pair


def test_a_round_is_rejected_only_when_its_whole_interval_is_below_half():
    losing = {"vs_previous": {"win_rate": 0.38, "ci_low": 0.30, "ci_high": 0.47}}
    unsure = {"vs_previous": {"win_rate": 0.44, "ci_low": 0.36, "ci_high": 0.5}}
    assert guard_verdict(losing, against_previous=True)["accepted"] is False
    assert "the whole interval is below 50%" in guard_verdict(losing, against_previous=True)["reason"]
    assert guard_verdict(unsure, against_previous=True)["accepted"] is True
    # the first round (or the first after rejections only) is held against the initial policy
    first = {"vs_baseline": {"win_rate": 0.30, "ci_low": 0.2, "ci_high": 0.41}, "vs_previous": {"ci_high": 0.9}}
    verdict = guard_verdict(first, against_previous=False)
    assert verdict["accepted"] is False and verdict["against"] == "vs_baseline" and "initial policy" in verdict["reason"]
    # no win rate (every comparison a judge error): nothing says the round did not lose
    errors = {"vs_previous": {"win_rate": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 6,
                              "errors": 6}}
    verdict = guard_verdict(errors, against_previous=True)
    assert verdict["accepted"] is False and "no win rate" in verdict["reason"] and "6 of 6" in verdict["reason"]
    assert guard_verdict({}, against_previous=True)["accepted"] is False


def result(r, win, accepted=True):
    return {"round": r, "eval": {"vs_baseline": {"win_rate": win}}, "guard": {"accepted": accepted}}


def test_best_round_is_the_accepted_round_that_beat_the_initial_policy_most():
    assert best_round([result(0, 0.6), result(1, 0.7), result(2, 0.65)]) == 1
    assert best_round([result(0, 0.6), result(1, 0.9, accepted=False), result(2, 0.6)]) == 2  # later of equals
    assert best_round([result(0, 0.45), result(1, 0.4)]) is None  # none reaches 50%: the initial policy
    assert best_round([{"round": 0}, {"round": 1}]) == 1  # no evals: the last accepted round
    no_rate = {"round": 1, "eval": {"vs_baseline": {"win_rate": float("nan")}}}
    assert best_round([result(0, 0.6), no_rate]) == 0  # evaluated without a win rate: never the best
    assert best_round([{"round": 0, "eval": {"vs_baseline": {"win_rate": None}}}]) is None
    assert best_round([]) is None


TINY = ["generation.backend=hf", "data.train_prompts_per_round=3", "generation.samples_per_prompt=3",
        "generation.max_new_tokens=10", "eval.max_new_tokens=8", "data.eval_prompts=6", "dpo.batch_size=1",
        "dpo.max_steps=2", "dpo.learning_rate=1e-4", "dpo.mixed_precision=no", "eval.diversity_prompts=0",
        "judge.name=length", "judge.options={max_chars: 12, slack: 200}"]


def run_in_process(out: Path, name: str, extra: list[str], reject: set[int], monkeypatch, command="run") -> Path:
    """online-dpo run (or resume) in this process, with the guard's rule made to reject the rounds in `reject`."""
    from online_dpo.cli import main
    from online_dpo.stages import evaluate as evaluate_stage  # where the round's record asks the guard
    rounds = itertools.count()  # one verdict per round run, in order

    def verdict(ev, against_previous):
        r = next(rounds)
        decided = guard_verdict(ev, against_previous)
        return {**decided, "accepted": False, "reason": f"made to reject round {r}"} if r in reject else decided

    monkeypatch.setattr(evaluate_stage, "guard_verdict", verdict)
    args = ["run", "configs/quickstart.yaml", f"output_dir={out}", f"name={name}", *TINY, *extra] if command == "run" \
        else ["resume", str(out / name), *extra]
    assert main(args) == 0
    return out / name


def reference_under(checkpoint: Path, rows: list[dict], pairs: list[dict]) -> list[tuple[float, float]]:
    from online_dpo.engines.models import load_policy, load_tokenizer

    tokenizer, model = load_tokenizer(str(checkpoint)), load_policy(str(checkpoint)).eval()
    by_key = {(p["prompt_id"], p["chosen_index"], p["rejected_index"]): p for p in pairs}
    out = []
    with torch.no_grad():
        for row in rows:
            p = by_key[(row["prompt_id"], row["chosen_index"], row["rejected_index"])]
            enc = encode_pair(chat_prompt_ids(tokenizer, p["prompt"]), p["chosen_token_ids"], p["rejected_token_ids"], 192)
            out.append(tuple(float(x) for x in batch_logps(model, collate_pairs([enc], tokenizer.pad_token_id))))
    return out


def test_a_rejected_round_is_rolled_back_and_the_next_starts_from_the_last_accepted_policy(tmp_path, monkeypatch,
                                                                                           shallow_model_path):
    from datasets import load_from_disk

    root = run_in_process(tmp_path, "retry", ["rounds=3", "guard.on_loss=retry", "save_checkpoints=all",
                                              f"policy.model={shallow_model_path}"], {1}, monkeypatch)
    manifest = json.loads((root / "manifest.json").read_text())
    assert [manifest["rounds"][str(r)]["eval"]["accepted"] for r in range(3)] == [True, False, True]
    assert not (root / "round_001" / "checkpoint").exists()  # the rejected policy is gone
    assert (root / "round_002" / "prompts.jsonl").exists()  # retried on the next round's fresh prompts
    # round 2 started from round 0's policy: its refreshed reference is round 0's checkpoint
    rows = read_jsonl(root / "round_002" / "reference_logps.jsonl")
    assert rows, "round 2 formed no pairs"
    saved = [(row["ref_chosen"], row["ref_rejected"]) for row in rows]
    pairs = load_from_disk(str(root / "round_002" / "pairs")).to_list()
    assert torch.allclose(torch.tensor(saved), torch.tensor(reference_under(root / "round_000" / "checkpoint", rows, pairs)),
                          atol=2e-3, rtol=0)
    # and was judged against round 0's responses, not the rejected round 1's
    ev2 = json.loads((root / "round_002" / "eval.json").read_text())["eval"]
    round0 = [row["text"] for row in read_jsonl(root / "round_000" / "eval_responses.jsonl")]
    assert [c["chars_b"] for c in ev2["comparisons"]["vs_previous"]] == [len(t) for t in round0]
    summary = json.loads((root / "summary.json").read_text())
    assert summary["best_round"] in (0, 2, None) and summary["stopped_after_round"] is None
    if summary["best_round"] is not None:
        assert (root / "best").resolve() == (root / f"round_{summary['best_round']:03d}" / "checkpoint").resolve()
    assert summary["rounds"][1]["guard"]["accepted"] is False and "made to reject round 1" in summary["rounds"][1]["guard"]["reason"]


def test_guard_stop_ends_the_campaign_at_the_rejected_round_and_resume_keeps_it_stopped(tmp_path, monkeypatch,
                                                                                      shallow_model_path):
    root = run_in_process(tmp_path, "stop", ["rounds=3", "guard.on_loss=stop", f"policy.model={shallow_model_path}"],
                          {0}, monkeypatch)
    summary = json.loads((root / "summary.json").read_text())
    assert summary["stopped_after_round"] == 0 and summary["best_round"] is None
    assert not (root / "round_001").exists() and not (root / "best").exists()
    assert not (root / "round_000" / "checkpoint").exists()
    root = run_in_process(tmp_path, "stop", [], set(), monkeypatch, command="resume")
    assert json.loads((root / "summary.json").read_text())["stopped_after_round"] == 0
    assert not (root / "round_001").exists()


def test_an_eval_of_judge_errors_stops_the_round_and_resume_judges_it_again(tmp_path, shallow_model_path, capsys):
    """A judge that judges the training candidates, then raises on every held-out comparison: the
    round stops (exit 6) with its update saved and no eval recorded, nothing is accepted or linked
    as best on it, and a resume with the judge fixed judges the eval again."""
    from online_dpo.cli import main

    name, common = "eval-errors", [*TINY[:-2], f"policy.model={shallow_model_path}", "rounds=1"]
    judge = ["judge.name=tests.custom_judges:BreaksAfterCalls"]
    assert main(["run", "configs/quickstart.yaml", f"output_dir={tmp_path}", f"name={name}", *common, *judge]) == 6
    err = capsys.readouterr().err
    assert "round 0 eval: 6 of 6 held-out comparisons against the initial policy were judge errors" in err, err
    assert "ConnectionError" in err and "online-dpo resume" in err
    root = tmp_path / name
    done = json.loads((root / "manifest.json").read_text())["rounds"]["0"]
    assert "checkpoint" in done and "eval" not in done  # the update is kept; no eval decided anything
    assert not (root / "round_000" / "eval.json").exists() and not (root / "best").exists()

    assert main(["resume", str(root), "judge.options.fine_calls=100"]) == 0
    record = json.loads((root / "round_000" / "eval.json").read_text())
    assert record["eval"]["vs_baseline"]["n"] == 6 and record["eval"]["vs_baseline"]["errors"] == 0
    assert record["judge_errors"] == {"train": 0, "eval": 0} and record["guard"]["accepted"] is True


def test_the_best_round_follows_the_pass_rate_where_the_rounds_have_one():
    def passed(r, rate, win, initial=0.2, accepted=True):
        return {"round": r, "eval": {"vs_baseline": {"win_rate": win}, "pass": {"pass_rate": rate,
                                                                                 "baseline_pass_rate": initial}},
                "guard": {"accepted": accepted}}

    # round 1 wins more often against the initial policy by the eval judge; round 2 passes more
    assert best_round([passed(0, 0.3, 0.6), passed(1, 0.35, 0.8), passed(2, 0.5, 0.7)]) == 2
    assert best_round([passed(0, 0.3, 0.6), passed(1, 0.6, 0.8, accepted=False)]) == 0  # rejected: never
    assert best_round([passed(0, 0.2, 0.7), passed(1, 0.1, 0.6)]) is None  # none above the initial policy's 20%
