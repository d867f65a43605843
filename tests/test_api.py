"""The Python API runs a real (tiny, HF-backend) campaign with a judge that is a plain
function, resumes it with the same judge, and reads the results back; the CLI runs one
whose judge is a class named by file reference. Each in a fresh process."""

import json
import textwrap

from tests.conftest import last_json_line, run_python

TINY = ["generation.backend=hf", "data.train_prompts_per_round=3", "generation.samples_per_prompt=3",
        "generation.max_new_tokens=8", "eval.max_new_tokens=8", "data.eval_prompts=6", "eval.diversity_prompts=0",
        "dpo.batch_size=1", "dpo.max_steps=2", "dpo.mixed_precision=no"]

SCRIPT = textwrap.dedent("""
    import json, sys
    import online_dpo
    from tests.custom_judges import shorter_is_better

    out, tiny = sys.argv[1], sys.argv[2:]
    cfg = online_dpo.load_config("configs/quickstart.yaml", [f"output_dir={out}", "name=api", "rounds=1", *tiny])
    first = online_dpo.run(cfg, judge=shorter_is_better)
    again = online_dpo.resume(cfg.run_dir, ["rounds=2"], judge=shorter_is_better)
    read = online_dpo.results(cfg.run_dir)
    print(json.dumps({"first": [r.round for r in first.rounds if r.complete],
                      "again": [r.round for r in again.rounds if r.complete],
                      "read": [r.result["pairs"] for r in read.rounds if r.complete],
                      "judge": read.config["judge"], "best": read.best.round,
                      "win_rates": [r.eval["vs_baseline"]["win_rate"] for r in read.rounds]}))
""")


def test_run_and_resume_with_a_function_judge_from_python(tmp_path, shallow_model_path):
    # the API's run, resume and results, whatever the policy answers: the shallow model (conftest)
    proc = run_python(["-c", SCRIPT, str(tmp_path), *TINY, f"policy.model={shallow_model_path}"], timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = last_json_line(proc.stdout)
    assert got["first"] == [0] and got["again"] == [0, 1]
    assert got["judge"]["name"] == "python:shorter_is_better" and got["judge"]["options"] == {}
    assert all(n >= 1 for n in got["read"])  # the function's scores formed pairs in both rounds
    assert len(got["win_rates"]) == 2 and all(0.0 <= w <= 1.0 for w in got["win_rates"])

    # the CLI cannot rebuild a Python judge from the config: it says how to continue instead
    cli = run_python(["-m", "online_dpo.cli", "resume", str(tmp_path / "api"), "rounds=3"], timeout=300)
    assert cli.returncode == 2 and "online_dpo.resume(run_dir, judge=...)" in cli.stderr, cli.stderr[-2000:]


def test_the_cli_runs_a_judge_class_named_by_its_file(tmp_path):
    proc = run_python(["-m", "online_dpo.cli", "run", "configs/quickstart.yaml", f"output_dir={tmp_path}", "name=file",
                       "rounds=1", *TINY, "judge.name=tests/custom_judges.py:CorrectFirst", "judge.options.bonus=1.0"],
                      timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rdir = tmp_path / "file" / "round_000"
    import pandas as pd

    scores = pd.read_parquet(rdir / "judgments.parquet")["score"].tolist()
    assert len(scores) == 9 and set(scores) <= {0.0, 2.0}  # CorrectFirst with bonus 1.0: 2 if correct, else 0
    assert json.loads((rdir / "eval.json").read_text())["eval"]["vs_baseline"]["n"] == 6


def test_a_run_stopped_by_its_input_before_any_stage_is_removed_and_any_other_stop_is_kept(tmp_path, monkeypatch):
    """Input to fix (exit 2): the same command must start again, so the empty run goes. A server
    down or a full disk: the message says to resume the run, so it stays."""
    import pytest

    import online_dpo
    from online_dpo import api
    from online_dpo.errors import DataError, GenerationServerError

    for error, kept in ((DataError("no such file: prompts.jsonl"), False),
                        (GenerationServerError("http://127.0.0.1:1", "cannot reach it"), True)):
        def stop(*args, error=error):
            raise error

        monkeypatch.setattr(api, "_campaign", stop)
        name = type(error).__name__
        cfg = online_dpo.load_config("configs/quickstart.yaml", [f"output_dir={tmp_path}", f"name={name}"])
        with pytest.raises(type(error)):
            online_dpo.run(cfg)
        assert (cfg.run_dir / "manifest.json").exists() == kept, error
