"""SIGKILL a campaign at several points, resume it each time, and compare the final
artifacts with an uninterrupted run of the same config and seed.

Kill points: mid-judging while later slices generate, mid-update and mid-evaluation (a kill
during the checkpoint save is tests/test_chaos.py's); the sequence also extends a finished 1-round campaign to 2 rounds with
`resume ... rounds=2`. The judge is the OpenAI judge against the local fake server,
which counts every request it answers, so "no judge call repeated" is checked at the
source. Generation uses the HF backend (the kill/resume logic is backend-agnostic, and
vLLM start-up seven times over would dominate the suite), and the policy is the shallow model
(tests/conftest.py): what is checked is that the resumed run ends as the uninterrupted one
does, whatever the policy answers; the fake judge prefers the shorter of any two answers.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.fake_openai_server import FakeOpenAI

CONFIG = ["generation.backend=hf", "data.train_prompts_per_round=4", "generation.samples_per_prompt=3",
          "generation.max_new_tokens=20", "eval.max_new_tokens=12", "data.eval_prompts=4",
          "dpo.batch_size=2", "dpo.epochs=2", "dpo.max_steps=-1", "dpo.learning_rate=1e-4", "save_checkpoints=last",
          # the diversity watch runs in the eval stage too (and must resume to the same numbers); kept small
          "eval.diversity_prompts=2", "eval.diversity_samples=2"]
KEY_ENV = {"FAKE_JUDGE_KEY": "sk-test-crash-0000"}


def judge_options(server: FakeOpenAI, cache: Path) -> list[str]:
    return ["judge.name=openai", "judge.options.model=fake", f"judge.options.base_url={server.base_url}",
            "judge.options.api_key_env=FAKE_JUDGE_KEY", f"judge.options.cache_path={cache}",
            "judge.options.max_concurrency=1"]


def start(args: list[str], log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **KEY_ENV}
    return subprocess.Popen([sys.executable, "-m", "online_dpo.cli", *args], cwd=ROOT, env=env, text=True,
                            stdout=open(log_path.with_suffix(".out"), "w"), stderr=subprocess.PIPE)


def run(args: list[str], log_path: Path, kill_on: str | None = None, delay: float = 0.0,
        until: Callable[[], bool] | None = None, timeout: float = 600) -> int:
    """Run the CLI; with `kill_on`, SIGKILL it `delay` s after a log line containing that text,
    or, with `until`, as soon as after that line `until()` holds (polled every millisecond: what
    a kill must land in, whatever else loads the machine)."""
    proc = start(args, log_path)
    deadline = time.monotonic() + timeout
    with open(log_path, "w") as log:
        for line in proc.stderr:
            log.write(line)
            if kill_on and kill_on in line:
                time.sleep(delay)
                while until is not None and not until() and proc.poll() is None:
                    time.sleep(0.001)
                proc.send_signal(signal.SIGKILL)
                kill_on = None
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"{args} ran past {timeout}s; log in {log_path}")
    return proc.wait()


def run_killed_at_request(server: FakeOpenAI, n: int, args: list[str], log_path: Path) -> int:
    """Run the CLI; the fake judge server SIGKILLs it when the n-th request from now arrives,
    before answering it (a kill at a known point, whatever else loads the machine)."""
    proc = start(args, log_path)
    server.kill_on_request(n, proc.pid)
    log_path.write_text(proc.stderr.read())
    return proc.wait()


def stages(run_dir: Path, r: int) -> set[str]:
    return set(json.loads((run_dir / "manifest.json").read_text())["rounds"].get(str(r), {}))


SPEND = ("judge_calls", "judge_cost")  # what this process paid: a resumed one pays nothing for cached replies


def without_spend(ev: dict) -> dict:
    """The eval results minus per-process spend; the fake server's own count checks spend below."""
    return {k: {kk: vv for kk, vv in v.items() if kk not in SPEND} if isinstance(v, dict) else v
            for k, v in ev.items()}


def artifacts(run_dir: Path) -> dict:
    from datasets import load_from_disk

    out = {}
    for r in (0, 1):
        rdir = run_dir / f"round_{r:03d}"
        metrics = [json.loads(line) for line in (rdir / "train_metrics.jsonl").read_text().splitlines()]
        out[r] = {
            "prompts": (rdir / "prompts.jsonl").read_text(),
            "pairs": load_from_disk(str(rdir / "pairs")).to_list(),
            "funnel": json.loads((rdir / "funnel.json").read_text()),
            "eval": without_spend(json.loads((rdir / "eval.json").read_text())["eval"]),
            "losses": [(m["step"], m["loss"], m["reward_margin"]) for m in metrics],
        }
    out["checkpoint"] = hashlib.sha256((run_dir / "round_001/checkpoint/model.safetensors").read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def config(shallow_model_path) -> list[str]:
    return [*CONFIG, f"policy.model={shallow_model_path}"]


@pytest.fixture(scope="module")
def uninterrupted(module_tmp, config):
    tmp = module_tmp
    with FakeOpenAI("shorter") as server:
        rc = run(["run", "configs/quickstart.yaml", f"output_dir={tmp}", "name=c", "rounds=2", *config,
                  *judge_options(server, tmp / "cache.sqlite")], tmp / "run.log")
        assert rc == 0, (tmp / "run.log").read_text()[-4000:]
        return artifacts(tmp / "c"), Counter(json.dumps(b, sort_keys=True) for b in server.answered)


def test_killed_three_times_and_resumed_ends_where_an_uninterrupted_run_ends(tmp_path, uninterrupted, config):
    expected, expected_requests = uninterrupted
    root = tmp_path / "c"
    logs = tmp_path
    with FakeOpenAI("shorter") as server:
        judge = judge_options(server, tmp_path / "cache.sqlite")
        resume = ["resume", str(root)]

        # 1. mid-judging of round 0 (a 1-round campaign, extended below): the API judge works on each
        # slice while the next generates (judge.overlap_generation=auto, one prompt a slice), so the
        # server kills the client when the 8th request arrives, before answering it, with later
        # slices generating or generated; the generate marker may or may not be on record yet, the
        # judge marker is not.
        assert run_killed_at_request(server, 8, ["run", "configs/quickstart.yaml", f"output_dir={tmp_path}",
                                                 "name=c", "rounds=1", *config, *judge], logs / "1.log") == -signal.SIGKILL
        assert "judge" not in stages(root, 0)
        assert "(slice 1/4)" in (logs / "1.log").read_text() and len(server.answered) == 7

        # 2. finish the 1-round campaign
        assert run(resume, logs / "2.log") == 0, (logs / "2.log").read_text()[-3000:]
        assert "eval" in stages(root, 0) and (root / "summary.json").exists()

        # 3. extend to 2 rounds; kill mid-update of round 1 (after its first optimizer step)
        rc = run([*resume, "rounds=2"], logs / "3.log", kill_on="round 1 update: step 1 ")
        assert rc == -signal.SIGKILL
        assert "pairs" in stages(root, 1) and "checkpoint" not in stages(root, 1)

        # 4. mid-evaluation of round 1 (the update and checkpoint redone; a kill during the checkpoint
        # write is test_chaos's): the 5th judge request of this process is an eval comparison
        assert run_killed_at_request(server, 5, resume, logs / "4.log") == -signal.SIGKILL
        assert "checkpoint" in stages(root, 1) and "eval" not in stages(root, 1)

        # 5. finish
        assert run(resume, logs / "5.log") == 0, (logs / "5.log").read_text()[-3000:]
        answered = Counter(json.dumps(b, sort_keys=True) for b in server.answered)

    got = artifacts(root)
    for r in (0, 1):
        for key in ("prompts", "pairs", "funnel", "eval", "losses"):
            assert got[r][key] == expected[r][key], f"round {r}: {key} differs from the uninterrupted run"
    assert got["checkpoint"] == expected["checkpoint"]
    assert got[0]["pairs"] and got[1]["pairs"], "the comparison is empty: no pairs were formed"
    # The judge answered each distinct request once, and exactly the requests of the uninterrupted run.
    assert max(answered.values()) == 1
    assert answered == expected_requests
    # Nothing half-written is left behind, and the resumes are on record.
    assert not [p for p in root.rglob(".*") if p.name.count(".") >= 2]
    manifest = json.loads((root / "manifest.json").read_text())
    assert [r["overrides"] for r in manifest["resumes"]] == [[], ["rounds=2"], [], []]
    assert "rounds: 2" in (root / "config.yaml").read_text()
