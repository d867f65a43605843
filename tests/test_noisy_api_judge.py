"""A campaign judged through the `openai` judge by a local OpenAI-compatible server whose verdicts
are imperfect (decisive answers flipped 15% of the time, the first-shown response preferred 70%
of the time on ties, log-probs on every reply): the judge's quality is measured per round, the
separation test's auto turns on from it, the pairs of the prompts the judge cannot separate
train without the chosen-response NLL, and a judge that separates nothing stops the round until
it is fixed. Generation is HF `generate` on the embedded model (the judging path is what is
tested; the vLLM campaigns are elsewhere)."""

from __future__ import annotations

import json
import subprocess
import sys

from datasets import load_from_disk

from judges.noisy import NoiseModel
from online_dpo.pairs import TIE, UNSEPARATED
from online_dpo.rundir import read_parquet
from tests.conftest import ROOT
from tests.fake_openai_server import FakeOpenAI

CONFIG = ["rounds=1", "generation.backend=hf", "data.train_prompts_per_round=6", "generation.samples_per_prompt=8",
          "generation.max_new_tokens=12", "data.eval_prompts=8", "eval.max_new_tokens=12", "eval.diversity_prompts=0",
          "dpo.max_steps=2", "dpo.batch_size=2"]


def cli(args: list[str], server: FakeOpenAI, model: str, tmp_path) -> subprocess.CompletedProcess:
    judge = ["judge.name=openai", f"judge.options.model={model}", f"judge.options.base_url={server.base_url}",
             "judge.options.api_key_env=null", f"judge.options.cache_path={tmp_path / 'cache.sqlite'}"]
    return subprocess.run([sys.executable, "-m", "online_dpo.cli", *args, *judge], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_a_judge_that_separates_nothing_stops_the_round_and_the_fixed_judge_resumes_it(tmp_path):
    run_dir = tmp_path / "noisy"
    with FakeOpenAI("always_a") as broken:  # answers "A" in both orders: every verdict flips with the order
        done = cli(["run", "configs/quickstart.yaml", f"output_dir={tmp_path}", "name=noisy", *CONFIG], broken,
                   "judge-v1", tmp_path)
    assert done.returncode == 6, done.stderr[-3000:]
    assert "round 0 judge: all 168 comparisons were ties (168) or errors (0)" in done.stderr
    assert "Traceback" not in done.stderr
    round0 = run_dir / "round_000"
    assert (round0 / "candidates.parquet").exists()
    assert not (round0 / "judgments.parquet").exists() and not (round0 / "pairs").exists()  # nothing to train on

    with FakeOpenAI("noisy", NoiseModel(flip_rate=0.15, position_bias=0.7)) as fixed:
        # The second order only where it decides the pair: through the API judge's client, counted as the server counts
        done = cli(["resume", str(run_dir), "judge.options.model=judge-v2", "judge.second_order=deciding"], fixed,
                   "judge-v2", tmp_path)
        answered = len(fixed.answered)
    assert done.returncode == 0, done.stderr[-3000:]
    # auto, from the round's verdicts: a judge wrong 15% of the time is not shown exact, so the test acts
    assert "pairs.separation_alpha=auto: each round, a prompt whose round robin does not separate" in done.stderr
    assert "round 0 pairs.separation_alpha=auto -> 0.2: on the " in done.stderr

    result = json.loads((round0 / "eval.json").read_text())
    quality = result["judge_quality"]
    assert quality["comparisons"] == 6 * 28 and quality["errors"] == 0
    assert 0.0 < quality["position_consistency"] < 1.0  # the server's position bias shows
    assert quality["tested_prompts"] == 6 and 0 <= quality["separated_prompts"] <= 6
    assert quality["separation_level"] == 0.2 and "separation test at 0.2" in done.stderr
    # the prompts the judge did not separate keep their pairs, without the chosen-response NLL
    funnel = result["funnel"]
    assert funnel["prompts_paired"] + funnel["dropped"].get(TIE, 0) == 6 and UNSEPARATED not in funnel["dropped"]
    assert funnel["without_nll"] == 6 - quality["separated_prompts"] - funnel["dropped"].get(TIE, 0)
    weights = load_from_disk(str(round0 / "pairs"))["chosen_nll_weight"]
    assert sorted(weights) == [0.0] * funnel["without_nll"] + [1.0] * (len(weights) - funnel["without_nll"])
    # every request the fixed judge answered is counted, in the training round robin and the eval
    assert result["judge_stats"]["requests"] == answered > 0
    games = read_parquet(round0 / "comparisons.parquet")
    asked = [g for g in games if g["position_consistent"] is not None]
    assert asked and all(g["prob_a"] is not None for g in asked)  # the replies' log-probs reached the verdicts
    assert "judge.second_order=deciding: every game asked in one order" in done.stderr
    assert 0 < len(asked) < len(games)  # games of the best and worst candidates only were asked both ways
    ref = quality["vs_reference"]  # where one candidate was right and another wrong, the judge mostly saw it
    assert ref["decisive"] > 0 and ref["accuracy"] >= 0.5
