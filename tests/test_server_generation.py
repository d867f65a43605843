"""generation.backend=vllm_server against real vLLM servers, started here on localhost with the
shallow model (the embedded model's first layers: tests/conftest.py) by `online-dpo serve`'s own
launcher: weight pushes checked by log-probs, stale answers refused, a campaign split across two
servers, one server killed mid-round and resumed, a server restarted with an API key. None of it
depends on what the policy answers, so the campaigns rank candidates by length (the shallow model
answers no sum right). Fault paths that need a server to misbehave on purpose use a small local
HTTP server."""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from online_dpo.engines.generate import Sampling
from online_dpo.errors import GenerationServerError, StaleWeightsError
from tests.conftest import BY_LENGTH, ROOT, free_port, run_python
from tests.local_http import LocalHTTPServer, QuietHandler

pytestmark = pytest.mark.vllm

MAX_MODEL_LEN = 512
# The DPO steps of the push test. Larger ones drive the probe completion's tokens to log-probs
# near -18, where bf16 rounding on both sides alone moves the probe gap past 0.1 on some CPUs.
PUSH_LR = 5e-5


class Servers:
    """Two vLLM servers on free ports; `restart(i)` brings a killed one back on its port."""

    def __init__(self, model_path: str, logs: Path):
        self.model_path, self.logs = model_path, logs
        self.ports = [free_port(), free_port()]
        self.processes: list[subprocess.Popen | None] = [None, None]
        self.urls = [f"http://127.0.0.1:{p}" for p in self.ports]

    def start(self, i: int, api_key_env: str | None = None) -> None:
        from online_dpo.engines.serve import start_server

        log = open(self.logs / f"server{i}.log", "a")
        # 0.25 GiB of KV cache each: two servers and a trainer share this machine.
        self.processes[i], _ = start_server(self.model_path, log_file=log, port=self.ports[i], seed=i,
                                            max_model_len=MAX_MODEL_LEN, kv_cache_gb=0.25, api_key_env=api_key_env)

    def wait(self, i: int, api_key: str | None = None) -> None:
        from online_dpo.engines.serve import wait_ready

        try:
            wait_ready(self.urls[i], self.processes[i], timeout_s=420, api_key=api_key)
        except GenerationServerError as e:
            pytest.fail(f"{e}\n{(self.logs / f'server{i}.log').read_text()[-3000:]}")

    def kill(self, i: int) -> None:
        from online_dpo.engines.serve import stop_server

        stop_server(self.processes[i], signal.SIGKILL)  # as a crash would: no shutdown

    def restart(self, i: int, api_key_env: str | None = None) -> None:
        import os

        self.start(i, api_key_env)
        self.wait(i, os.environ[api_key_env] if api_key_env else None)

    def log_tails(self, lines: int = 30) -> str:
        """The end of each server's log for a failure message, without the weight-loading noise."""
        def tail(i: int) -> str:
            kept = [line for line in (self.logs / f"server{i}.log").read_text(errors="replace").splitlines()
                    if "Attempted to load weight" not in line]
            return "\n".join(kept[-lines:])

        return "".join(f"\n--- server {i} ({self.urls[i]}) log ---\n{tail(i)}" for i in range(len(self.ports)))

    def stop(self) -> None:
        from online_dpo.engines.serve import stop_server

        for p in self.processes:
            if p is not None:
                stop_server(p)


@pytest.fixture(scope="module")
def servers(shallow_model_path, tmp_path_factory):
    s = Servers(shallow_model_path, tmp_path_factory.mktemp("servers"))
    s.start(0)
    s.start(1)  # both start at once; each takes about a minute here
    s.wait(0)
    s.wait(1)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def policy(shallow_model_path):
    from online_dpo.engines.models import load_policy, load_tokenizer

    return load_policy(shallow_model_path), load_tokenizer(shallow_model_path)


def trainer_autocast():
    """The trainer's mixed precision on this machine, which the servers' dtype follows (both auto)."""
    import torch

    from online_dpo import hardware

    return torch.bfloat16 if hardware.resolve_mixed_precision("auto", hardware.Hardware.detect()).value == "bf16" else None


def probe_of(model, tokenizer):
    from online_dpo.engines.server import policy_probe

    return policy_probe(model, tokenizer, trainer_autocast())


def generator_for(urls, tokenizer, model, root: Path, prefix: str, **options):
    from online_dpo.engines.server import ServerGenerator
    from online_dpo.engines.transports import DiskTransport

    return ServerGenerator(urls, tokenizer, DiskTransport(root), probe_policy=lambda: probe_of(model, tokenizer),
                           tolerance=0.1, label_prefix=prefix, **options)


def as_started(servers, policy, tmp_path, i: int = 0) -> None:
    """Server i holds the model it started with under vLLM's never-pushed label, as one just started
    does (the tests before have pushed other campaigns' weights to it)."""
    from online_dpo.engines.server import NEVER_PUSHED
    from online_dpo.train import lora

    initial, tokenizer = policy
    gen = generator_for([servers.urls[i]], tokenizer, initial, tmp_path / "as-started", "as-started/")
    gen.update_weights(lora.merged_weights(initial), "initial")
    gen.servers[0].request("POST", "/update_weight_version", json={"new_version": NEVER_PUSHED})


def dpo_step(model, tokenizer, probe) -> None:
    """A real DPO update that makes the probe's completion less likely (it is the rejected side)."""
    import torch
    from accelerate import Accelerator

    from online_dpo.config import DPOConfig
    from online_dpo.train.logps import reference_logps
    from online_dpo.train.packing import collate_pairs, encode_pair
    from online_dpo.train.update import train_round

    better = tokenizer("7 + 5 = 13.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    batches = [collate_pairs([encode_pair(probe.prompt_ids, better, probe.completion_ids, 128)], tokenizer.pad_token_id)]
    accelerator = Accelerator(cpu=True)
    ref = reference_logps(model, batches, accelerator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PUSH_LR)
    train_round(model, optimizer, batches, ref, DPOConfig(learning_rate=PUSH_LR, max_steps=2, batch_size=1,
                                                          mixed_precision="no"), accelerator)
    model.eval()


def test_a_push_reaches_the_server_and_is_checked_by_log_probs(servers, policy, tmp_path):
    """After each push the server's log-probs of a fixed completion equal the trainer's policy
    (mean gap under 0.1 nats/token; about 1e-5 with float32 on both sides, a few hundredths
    with bf16) and differ from the previous version's by far more."""
    import copy

    from online_dpo.engines.server import probe_gap
    from online_dpo.train import lora

    initial, tokenizer = policy
    model = copy.deepcopy(initial)
    gen = generator_for(servers.urls[:1], tokenizer, model, tmp_path / "pushed", "push-test/")
    server = gen.servers[0]
    previous = probe_of(model, tokenizer)
    assert probe_gap(server, previous) < 0.1  # it serves the policy's model
    try:
        for version in ("v1", "v2"):
            dpo_step(model, tokenizer, previous)
            now = probe_of(model, tokenizer)
            gen.update_weights(lora.merged_weights(model), version)
            assert server.weight_version() == f"push-test/{version}"
            held, before = probe_gap(server, now), probe_gap(server, previous)
            assert held == pytest.approx(gen.probe_gaps[0]) and held < 0.1
            # the update moved the probe's log-probs far more than bf16 rounding does
            assert before > 3 * held and before > 0.1, (held, before)
            previous = now
        assert sorted(p.name for p in (tmp_path / "pushed").iterdir()) == ["v1", "v2"]
    finally:  # the other tests expect the initial model
        restore = generator_for(servers.urls[:1], tokenizer, initial, tmp_path / "pushed", "push-test/")
        restore.update_weights(lora.merged_weights(initial), "initial")
    assert probe_gap(server, probe_of(initial, tokenizer)) < 0.1


def test_an_answer_from_other_weights_is_refused(servers, policy, tmp_path):
    from online_dpo.data.prompts import Prompt

    model, tokenizer = policy
    gen = generator_for(servers.urls[:1], tokenizer, model, tmp_path, "stale-test/", seed_requests=False)
    gen.label("v1")
    prompt = Prompt(id="p0", messages=[{"role": "user", "content": "What is 2 + 3?"}], reference="5")
    sampling = Sampling(n=2, temperature=1.0, top_p=1.0, max_new_tokens=8, seed=0)
    assert {c.weight_version for c in gen.generate([prompt], sampling)[0]} == {"v1"}
    # Another trainer (or a push this one never made) relabels the server's weights.
    gen.servers[0].request("POST", "/update_weight_version", json={"new_version": "someone-else/v7"})
    with pytest.raises(StaleWeightsError, match=r"someone-else/v7.*not the pushed version 'v1'"):
        gen.generate([prompt], sampling)


def test_many_seeded_requests_at_once_keep_a_cpu_server_alive(servers, policy, tmp_path):
    """128 seeded prompts in flight: more prompt tokens than one engine step takes. With chunked
    prefill a CPU server splits a prefill, cannot rewind that request's generator and dies
    ('CPU Generator does not use offset'); `online-dpo serve` starts CPU servers without it."""
    from online_dpo.data.prompts import Prompt

    model, tokenizer = policy
    gen = generator_for(servers.urls[:1], tokenizer, model, tmp_path, "burst-test/", max_concurrent=64)
    gen.label("v1")
    prompts = [Prompt(id=f"p{i}", messages=[{"role": "user", "content": f"What is {i} + {i + 3}? Explain step by step."}])
               for i in range(128)]
    out = gen.generate(prompts, Sampling(n=1, temperature=1.0, top_p=1.0, max_new_tokens=8, seed=0))
    assert len(out) == 128 and all(len(cs) == 1 and cs[0].token_ids for cs in out)


def share_identical(a: list[list[list[int]]], b: list[list[list[int]]]) -> float:
    """The share of samples, each prompt's K in order, whose tokens are the same in a and b."""
    pairs = [(x, y) for xs, ys in zip(a, b, strict=True) for x, y in zip(xs, ys, strict=True)]
    return sum(x == y for x, y in pairs) / len(pairs)


def test_a_seeded_request_is_drawn_by_its_seed_on_either_server_alone_or_among_others(servers, policy, tmp_path):
    """What per-request seeds reproduce on CPU servers (started without chunked prefill). The
    request's seed, not the server's own --seed, draws its K samples, so they agree on either
    server and whether the request runs alone or among the others, up to the kernels' rounding:
    CPU kernels are not batch-invariant, and how vLLM batches a request's K samples, its cached
    prefix and its neighbours changes the rounding, so a sample can part from its twin wherever
    that moves a draw. A server that dropped the seed would agree on almost none, as another
    seed does."""
    from concurrent.futures import ThreadPoolExecutor

    from online_dpo.data.prompts import Prompt
    from online_dpo.train import lora

    initial, tokenizer = policy
    both = generator_for(servers.urls, tokenizer, initial, tmp_path / "pushed", "seed-test/")
    both.update_weights(lora.merged_weights(initial), "initial")  # both hold exactly the same weights
    prompts = [Prompt(id=f"p{i}", messages=[{"role": "user", "content": f"What is {i % 9 + 1} x {i % 7 + 2}?"}])
               for i in range(12)]
    sampling = Sampling(n=4, temperature=1.0, top_p=1.0, max_new_tokens=16, seed=0)

    def samples(urls, seed=0, max_concurrent=64):
        gen = generator_for(urls, tokenizer, initial, tmp_path, "seed-test/", max_concurrent=max_concurrent)
        gen.version = "initial"
        out = gen.generate(prompts, dataclasses.replace(sampling, seed=seed))
        return [[c.token_ids for c in cs] for cs in out]

    with ThreadPoolExecutor(2) as pool:  # one request in flight at a time on each server, both servers at once
        alone, other_server = pool.map(lambda url: samples([url], max_concurrent=1), servers.urls)
    agree = {"other server": share_identical(other_server, alone),
             "among others": share_identical(samples(servers.urls[:1]), alone),
             "another seed": share_identical(samples(servers.urls[:1], seed=1), alone)}
    assert agree["other server"] > 0.5 and agree["among others"] > 0.25 and agree["another seed"] < 0.1, agree


# The campaigns here check where candidates come from and what survives a failure, none of which
# depends on how long the answers are: short ones keep the float32 path's decoding short.
SHORT_ANSWERS = ["generation.max_new_tokens=12", "eval.max_new_tokens=12"]


def policy_of(servers) -> list[str]:
    """The servers' model, and a judge that ranks any text: every round has pairs, so every update is pushed."""
    return [f"policy.model={servers.model_path}", *BY_LENGTH]


def run_cli(tmp_path, name: str, *overrides: str) -> subprocess.CompletedProcess:
    """`online-dpo run configs/quickstart.yaml` with a server backend, in a fresh process."""
    return run_python(["-m", "online_dpo.cli", "run", "configs/quickstart.yaml", f"output_dir={tmp_path}",
                       f"name={name}", "rounds=1", "generation.backend=vllm_server", *SHORT_ANSWERS, *overrides],
                      timeout=600)


def test_a_server_with_another_model_is_refused_at_start(servers, policy, tmp_path):
    """The policy is a changed copy of the servers' model: the server (started with that
    model) fails the start check, and the error says how to start the right one."""
    import torch

    as_started(servers, policy, tmp_path)
    model, tokenizer = policy
    other = tmp_path / "other-model"
    changed = type(model).from_pretrained(servers.model_path)
    with torch.no_grad():
        for p in changed.parameters():
            p.mul_(1.05)
    changed.save_pretrained(other)
    tokenizer.save_pretrained(other)
    out = run_cli(tmp_path, "other", f"policy.model={other}", f"servers.urls=[{servers.urls[0]}]")
    assert out.returncode == 5, out.stderr[-3000:]
    assert re.search(rf"stopped: generation server {re.escape(servers.urls[0])} during start: does not hold the "
                     rf"policy's initial model: .* differ from the policy's by [0-9.]+ nats per token.*"
                     rf"online-dpo serve <policy.model>", out.stderr), out.stderr[-2000:]


def test_errors_name_the_server_down_at_start_and_a_server_without_dev_mode(tmp_path, servers):
    from online_dpo.engines.server import Server

    down = f"http://127.0.0.1:{free_port()}"
    out = run_cli(tmp_path, "down", f"servers.urls=[{down}]", *policy_of(servers))
    assert out.returncode == 5 and f"generation server {down} during start: cannot reach it" in out.stderr, out.stderr

    plain = PlainOpenAIServer()  # an OpenAI-compatible server without the dev-mode routes
    try:
        out = run_cli(tmp_path, "plain", f"servers.urls=[{plain.url}]", *policy_of(servers))
        assert out.returncode == 5
        assert re.search(r"lacks .*/pause \(needs VLLM_SERVER_DEV_MODE=1\).*online-dpo serve", out.stderr), out.stderr
    finally:
        plain.close()

    with pytest.raises(GenerationServerError, match=r"timed out after 0 s \(servers.timeout_s\)"):
        Server(servers.urls[0], timeout_s=0.001).generate(list(range(1, 200)), {"n": 4, "max_tokens": 32})


class PlainOpenAIServer(LocalHTTPServer):
    """Answers /openapi.json with the plain OpenAI routes only, as `vllm serve` without dev mode would."""

    def __init__(self):
        class Handler(QuietHandler):
            def do_GET(self):
                self.send_json({"paths": {"/v1/completions": {}, "/v1/models": {}, "/health": {}}})

        super().__init__(Handler)


def test_async_rounds_generate_the_next_round_during_the_update(servers, tmp_path):
    """generation.async_rounds=1: round 1's candidates come from the initial policy (one round
    off-policy), generated while round 0's update ran, and the manifest says so."""
    from online_dpo.rundir import RunDir

    out = run_cli(tmp_path, "async", "rounds=2", "data.train_prompts_per_round=4", "generation.samples_per_prompt=4",
                  "data.eval_prompts=8", "eval.diversity_prompts=0", "dpo.max_steps=2", "generation.async_rounds=1",
                  f"servers.urls=[{servers.urls[0]},{servers.urls[1]}]", *policy_of(servers))
    assert out.returncode == 0, out.stderr[-3000:] + servers.log_tails()
    rounds = RunDir(tmp_path / "async").manifest["rounds"]
    assert [rounds[r]["generate"]["policy_version"] for r in ("0", "1")] == ["initial", "initial"]
    assert rounds["1"]["generate"]["at"] < rounds["0"]["checkpoint"]["at"]  # before round 0's update was saved
    assert "round 1 generate (async): by initial while round 0's update runs" in out.stderr
    assert "pushed round-0" in out.stderr and "pushed round-1" in out.stderr


def request_counts(url: str) -> int:
    import httpx

    text = httpx.get(f"{url}/metrics").text
    return int(sum(float(v) for v in re.findall(r'^vllm:request_success_total\{[^}]*\} ([0-9.]+)$', text, re.M)))


def test_two_rounds_on_two_servers_survive_a_killed_server(servers, tmp_path):
    """A 2-round campaign split across both servers, which another campaign pushed to: they
    get the initial model loaded. Server 1 is killed as round 1 starts generating: the run stops
    with an error naming it and the round; once it is back, resume finishes with every round's
    candidates there exactly once, from the right policy version. (Whether the regenerated
    round samples what the uninterrupted one would have depends on the server's batching: see
    the seeded-sampling test.)"""
    import pandas as pd

    from online_dpo.engines.server import Server
    from online_dpo.rundir import RunDir

    name, P, K = "two-servers", 6, 4
    cmd = [sys.executable, "-m", "online_dpo.cli", "run", "configs/quickstart.yaml", f"output_dir={tmp_path}",
           f"name={name}", "rounds=2", f"data.train_prompts_per_round={P}", f"generation.samples_per_prompt={K}",
           "data.eval_prompts=8", "eval.diversity_prompts=4", "dpo.max_steps=2", "generation.backend=vllm_server",
           f"servers.urls=[{servers.urls[0]},{servers.urls[1]}]", *SHORT_ANSWERS, *policy_of(servers)]
    for url in servers.urls:
        Server(url, timeout_s=30).request("POST", "/update_weight_version", json={"new_version": "another-campaign/round-3"})
    before = [request_counts(u) for u in servers.urls]
    campaign = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = RunDir(tmp_path / name)
    deadline = time.monotonic() + 600
    while not (run.manifest_path.exists() and RunDir(run.root).is_done(0, "eval")):
        assert campaign.poll() is None, campaign.stdout.read()[-3000:] + servers.log_tails()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    servers.kill(1)  # round 1 is generating now (its 24 short answers take the servers well over 5 ms)
    out, _ = campaign.communicate(timeout=300)
    assert campaign.returncode == 5, out[-3000:] + servers.log_tails()
    assert "hold another campaign's weights; loading the initial model" in out
    assert re.search(rf"stopped: generation server {re.escape(servers.urls[1])} during round 1: cannot reach it", out)
    assert f"online-dpo resume {tmp_path / name}" in out
    assert not RunDir(run.root).is_done(1, "generate")
    after_round0 = [request_counts(u) for u in servers.urls[:1]]
    assert after_round0[0] > before[0]

    servers.restart(1)
    resumed = subprocess.run([sys.executable, "-m", "online_dpo.cli", "resume", str(run.root)], cwd=ROOT,
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:] + servers.log_tails()
    run = RunDir(run.root)
    prompts_of = {r: [json.loads(line)["id"] for line in run.round_paths(r).prompts.read_text().splitlines()]
                  for r in (0, 1)}
    for r, version in ((0, "initial"), (1, "round-0")):
        rows = pd.read_parquet(run.round_paths(r).candidates)
        assert len(rows) == P * K
        assert sorted(zip(rows.prompt_id, rows["index"])) == sorted((p, i) for p in prompts_of[r] for i in range(K))
        assert set(rows.weight_version) == {version}
        assert run.manifest["rounds"][str(r)]["generate"]["policy_version"] == version
    assert run.is_done(1, "eval")
    # both servers took a share: server 1 answered requests after its restart (round 1, the evals)
    assert request_counts(servers.urls[1]) > 0 and request_counts(servers.urls[0]) > after_round0[0]
