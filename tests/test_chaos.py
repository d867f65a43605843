"""Chaos, all at once: one campaign (the shallow model, two rounds) meets every failure the
loop is built to survive, in the same run, and ends byte for byte where a quiet run of the
same config and seed ends, timings aside.

- The judge is the OpenAI judge against a flaky server (tests/fake_openai_server.py's
  FlakyOpenAI): a seeded quarter of its requests fail once each, with an HTTP 500, a 429 with
  Retry-After, or a hang past the client's timeout, which the client's retries absorb. Before
  two of the kills its next two replies are garbage (cut-off JSON, which the client does not
  retry: a counted judge error), so the judgments in memory hold errors when the trainer dies;
  the resumed round asks again (errors are never cached) and gets good answers.
- Generation runs on a real vLLM server, which is SIGKILLed (its process group) with a round's
  generate request in flight: the trainer stops with exit 5, the server is restarted, and
  `online-dpo resume` goes on.
- The trainer is SIGKILLed three times: mid-generation while the first slices are judged, while
  it writes a checkpoint (after the update and its push), and mid-eval; and resumed each time.
- The server is keyed, as `online-dpo serve` must be beyond loopback: every request the trainer
  makes carries the key (servers.api_key_env), and a request without it is refused on every
  path, dev mode's included (the module's second test).

The quiet run is the same config against a well-behaved judge server, never killed. What must
be equal: every file of the run directory, byte for byte (prompts, candidates, judgments,
comparisons, pairs, reference log-probs, held-out responses, ...), except that safetensors are
compared tensor by tensor (the pushed weights' metadata order is not stable), and the files
that hold timings or the judge spend of the process that finished the round (eval.json,
summary.json, train_metrics.jsonl, manifest.json) are compared without those fields; config.yaml
without the fields naming the run's folder and judge server.

Why candidates are the same after kills and a server restart: a stage finished before a kill
is read back, not redone; one that was not is redone with the same seeds. Each request carries
its own seed (servers.seed_requests), a round generates in slices of one prompt (one request
each: the API judge's overlap), and on this model and these lengths a CPU server (bf16, and
float32 as on AVX2-only machines) samples a seeded request alike alone or among others, with a
warm or a cold prefix cache, before and after a restart and after a reload of the same weights.
Were a server's batching ever to change its samples, servers.max_concurrent_requests=1 would
fix each request's batch (the held-out eval's six are the only ones sent together here).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fake_openai_server import FakeOpenAI, FlakyOpenAI
from tests.test_crash_resume import run, run_killed_at_request, stages, start
from tests.test_server_generation import Servers

pytestmark = pytest.mark.vllm

CONFIG = ["rounds=2", "generation.backend=vllm_server", "data.train_prompts_per_round=3",
          "generation.samples_per_prompt=3", "generation.max_new_tokens=8", "eval.max_new_tokens=8",
          "data.eval_prompts=6", "eval.diversity_prompts=0", "dpo.batch_size=1", "dpo.max_steps=2",
          "dpo.mixed_precision=no", "save_checkpoints=all",
          "servers.timeout_s=120"]  # a request to the frozen server (step 4) fails in 2 minutes, not 10
JUDGE_TIMEOUT_S, HANG_S = 1.5, 2.0  # a hang outlasts the client's timeout once; its retry is answered

# What differs between any two runs, or between the processes that finished a round: when and
# how fast (timings), and what that process paid the judge (a resumed one finds replies cached).
TIMING = {"at", "wall_s", "timings", "train_tokens_per_s"}
SPEND = {"judge_stats", "judge_calls", "judge_cost"}
# The files holding them, the only ones compared field by field rather than byte for byte.
FIELD_COMPARED = {"eval.json", "summary.json", "train_metrics.jsonl", "manifest.json", "config.yaml"}


def judge_options(server: FakeOpenAI, cache: Path) -> list[str]:
    return ["judge.name=openai", "judge.options.model=fake", f"judge.options.base_url={server.base_url}",
            "judge.options.api_key_env=FAKE_JUDGE_KEY", f"judge.options.cache_path={cache}",
            f"judge.options.timeout_s={JUDGE_TIMEOUT_S}", "judge.options.max_retries=3"]


SERVER_KEY_ENV, SERVER_KEY = "TEST_SERVER_KEY", "s3cret-for-tests"


@pytest.fixture(scope="module")
def servers(shallow_model_path, module_tmp):
    with pytest.MonkeyPatch.context() as env:  # the trainers these tests start inherit it
        env.setenv(SERVER_KEY_ENV, SERVER_KEY)
        s = Servers(shallow_model_path, module_tmp)  # one of its two slots is used
        s.start(0, api_key_env=SERVER_KEY_ENV)
        s.wait(0, api_key=SERVER_KEY)
        yield s
        s.stop()


@pytest.fixture(scope="module")
def config(servers) -> list[str]:
    return [*CONFIG, f"policy.model={servers.model_path}", f"servers.urls=[{servers.urls[0]}]",
            f"servers.api_key_env={SERVER_KEY_ENV}"]


@pytest.fixture(scope="module")
def quiet(module_tmp, config) -> Path:
    out = module_tmp / "quiet"
    with FakeOpenAI("consistent") as judge:
        rc = run(["run", "configs/quickstart.yaml", f"output_dir={out}", "name=c", *config,
                  *judge_options(judge, module_tmp / "quiet-cache.sqlite")], module_tmp / "quiet.log")
    assert rc == 0, (module_tmp / "quiet.log").read_text()[-4000:]
    return out / "c"


def run_watching(args: list[str], log_path: Path, on_line: dict[str, Callable[[], None]], timeout: float = 600) -> int:
    """Run the CLI; call on_line[text]() once, as soon as a log line containing text appears."""
    proc = start(args, log_path)
    deadline = time.monotonic() + timeout
    with open(log_path, "w") as log:
        for line in proc.stderr:
            log.write(line)
            for text in [t for t in on_line if t in line]:
                on_line.pop(text)()
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"{args} ran past {timeout}s; log in {log_path}")
    return proc.wait()


def test_a_campaign_through_judge_faults_a_killed_server_and_three_kills_ends_as_a_quiet_one(
        quiet, servers, config, module_tmp):
    out, logs = module_tmp / "chaos", module_tmp
    root = out / "c"
    resume = ["resume", str(root)]
    url = servers.urls[0]
    with FlakyOpenAI("consistent", seed=0, rate=0.25) as judge:
        judge.hang_s = HANG_S

        # 1. While round 0 generates and judges: the judge works on each slice (one prompt) while the next
        # generates; its first two replies are garbage, and the 8th request kills the trainer.
        judge.garbage_next(2)
        rc = run_killed_at_request(judge, 8, ["run", "configs/quickstart.yaml", f"output_dir={out}", "name=c",
                                              *config, *judge_options(judge, module_tmp / "chaos-cache.sqlite")],
                                   logs / "1.log")
        assert rc == -signal.SIGKILL, (logs / "1.log").read_text()[-3000:]
        assert "judge" not in stages(root, 0) and judge.served["garbage"] == 2

        # 2. While round 0's checkpoint is written (after the update, and its push to the server).
        rc = run(resume, logs / "2.log", kill_on="round 0 checkpoint: saving",
                 until=lambda: any((root / "round_000").glob(".checkpoint.*/*")))
        assert rc == -signal.SIGKILL, (logs / "2.log").read_text()[-3000:]
        assert "pairs" in stages(root, 0) and "checkpoint" not in stages(root, 0)
        assert list((root / "round_000").glob(".checkpoint.*")), "the kill missed the checkpoint save"

        # 3. Mid-eval of round 0: the update is redone (its checkpoint was never finished), and of
        # the eval's comparisons, two get garbage and the 6th request kills the trainer.
        judge.garbage_next(2)
        rc = run_killed_at_request(judge, 6, resume, logs / "3.log")
        assert rc == -signal.SIGKILL, (logs / "3.log").read_text()[-3000:]
        assert "checkpoint" in stages(root, 0)
        assert "eval" not in stages(root, 0), (  # the API judge asks 12 times (6 comparisons, both orders)
            "round 0's eval was over before the 6th judge request of this process came; was it judged by another "
            f"judge? {json_of(root / 'round_000/eval.json')['eval']['comparisons']['vs_baseline'][0]}")
        assert judge.served["garbage"] == 4
        assert "removed an unfinished write" in (logs / "3.out").read_text()

        # 4. The generation server dies with round 1's first generate request in flight: it is
        # frozen as round 0's eval is judged (after its last generate call), and killed once
        # round 1 has started generating. The trainer stops with exit 5.
        server_pid = servers.processes[0].pid
        judge.on_request(1, lambda: os.killpg(server_pid, signal.SIGSTOP))
        rc = run_watching(resume, logs / "4.log", {"round 1 generate:": lambda: (time.sleep(0.5), servers.kill(0))})
        log4 = (logs / "4.log").read_text()
        assert rc == 5, log4[-3000:]
        assert f"stopped: generation server {url} during round 1: cannot reach it" in log4, log4[-3000:]
        assert f"online-dpo resume {root}" in log4
        assert "eval" in stages(root, 0) and "generate" not in stages(root, 1)

        # 5. The server restarted (it holds the initial model again): resume finishes the campaign.
        servers.restart(0, api_key_env=SERVER_KEY_ENV)
        rc = run(resume, logs / "5.log")
        assert rc == 0, (logs / "5.log").read_text()[-3000:]
        served = dict(judge.served)

    # Every kind of fault was met (garbage on purpose, the rest by the seeded draw), and none is on
    # record: the garbage died with the processes that got it.
    assert set(served) == set(FlakyOpenAI.KINDS), served
    for r in (0, 1):
        record = json_of(root / f"round_00{r}/eval.json")
        assert record["funnel"]["judge_errors"] == 0 and record["eval"]["vs_baseline"]["errors"] == 0
    assert not [p for p in root.rglob(".*")], "a half-written file or folder was left behind"
    assert len(json_of(root / "manifest.json")["resumes"]) == 4
    assert json_of(quiet / "round_001/funnel.json")["pairs"], "nothing to compare: no pairs were formed"
    assert differences(quiet, root) == []


def json_of(path: Path):
    import json

    return json.loads(path.read_text())


def without(obj, keys: set[str]):
    """obj with every dict entry named in `keys` removed, at any depth."""
    if isinstance(obj, dict):
        return {k: without(v, keys) for k, v in obj.items() if k not in keys}
    if isinstance(obj, list):
        return [without(v, keys) for v in obj]
    return obj


def field_compared(path: Path):
    """A FIELD_COMPARED file's content without what may differ between two runs that ended alike."""
    import json

    import yaml

    if path.name == "config.yaml":
        cfg = yaml.safe_load(path.read_text())
        cfg.pop("output_dir")
        for key in ("base_url", "cache_path"):  # the judge server's address and the reply cache's file
            cfg["judge"]["options"].pop(key)
        return cfg
    if path.suffix == ".jsonl":
        return [without(json.loads(line), TIMING | SPEND) for line in path.read_text().splitlines()]
    content = without(json.loads(path.read_text()), TIMING | SPEND)
    if path.name == "manifest.json":
        content.pop("created")
        content.pop("resumes", None)  # the chaotic run's resumes
    return content


def same_tensors(a: Path, b: Path) -> bool:
    import torch
    from safetensors import safe_open

    with safe_open(a, framework="pt") as x, safe_open(b, framework="pt") as y:
        return (x.metadata() == y.metadata() and sorted(x.keys()) == sorted(y.keys())
                and all(torch.equal(x.get_tensor(k), y.get_tensor(k)) for k in x.keys()))


def differences(expected: Path, got: Path) -> list[str]:
    """Every file of run directory `got` that differs from `expected`'s (or is only in one)."""
    def files(root: Path) -> set[Path]:
        return {p.relative_to(root) for p in root.rglob("*") if p.is_file()}

    want, have = files(expected), files(got)
    out = [f"only in the quiet run: {p}" for p in sorted(want - have)]
    out += [f"only in the chaotic run: {p}" for p in sorted(have - want)]
    for rel in sorted(want & have):
        a, b = expected / rel, got / rel
        if a.read_bytes() == b.read_bytes():
            continue
        if rel.suffix == ".safetensors":
            same = same_tensors(a, b)
        elif rel.name in FIELD_COMPARED:
            same = field_compared(a) == field_compared(b)
        else:
            same = False
        if not same:
            out.append(f"differs: {rel}")
    return out


def test_the_campaigns_keyed_server_refuses_every_request_without_its_key(servers):
    """The server the campaign above ran on (it checked, pushed to and generated from it with the
    key): without the key, or with another, vLLM's guarded paths (/v1, /inference) and the ones
    it leaves open (dev mode's /collective_rpc, /resume, /is_paused, /weight_info; /health) all
    answer 401, and with it they answer."""
    import httpx

    url = servers.urls[0]
    # requests that change nothing were the guard missing (a /pause would stall the server)
    calls = [("GET", "/v1/models", None), ("POST", "/inference/v1/generate", {}), ("GET", "/is_paused", None),
             ("POST", "/resume", None), ("POST", "/collective_rpc", {"method": "no_such_method"}),
             ("GET", "/weight_info", None), ("GET", "/health", None)]
    for headers in ({}, {"Authorization": "Bearer another-key"}):
        answers = {path: httpx.request(method, url + path, json=body, headers=headers).status_code
                   for method, path, body in calls}
        assert answers == {path: 401 for _, path, _ in calls}, answers
    key = {"Authorization": f"Bearer {SERVER_KEY}"}
    assert httpx.get(f"{url}/is_paused", headers=key).json() == {"is_paused": False}
    assert httpx.get(f"{url}/health", headers=key).status_code == 200
