"""Generation on vLLM servers (generation.backend=vllm_server): prompts split across servers,
weight versions checked on every answer, new weights pushed with pause / load / resume.

The servers are vLLM's OpenAI-compatible server with dev mode and the scale-out endpoints on
(`online-dpo serve MODEL` starts one so). A request is the chat-templated prompt's token ids
(`/inference/v1/generate`), so the server samples exactly the tokens the update trains on,
and each answer carries the weight versions that sampled it; an answer from any version but
the one last pushed is refused (`StaleWeightsError`). Pushing a version: every server is
paused (in-flight requests finish), loads the weights through the transport, drops its prefix
cache, takes the version label, and resumes. Where the servers require an API key (`online-dpo
serve` beyond loopback), every request carries it, read from the variable servers.api_key_env.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from online_dpo.data.prompts import Prompt
from online_dpo.engines.generate import Completion, Sampling, prompt_token_ids
from online_dpo.engines.ranks import rank_share
from online_dpo.errors import ConfigError, GenerationServerError, StaleWeightsError
from online_dpo.seeds import stable_seed

log = logging.getLogger("online_dpo")

# The endpoints a server must expose; a plain `vllm serve` without dev mode or scale-out lacks them.
REQUIRED_ROUTES = {"/inference/v1/generate": "--enable-scale-out", "/pause": "VLLM_SERVER_DEV_MODE=1",
                   "/collective_rpc": "VLLM_SERVER_DEV_MODE=1", "/update_weight_version": "VLLM_SERVER_DEV_MODE=1"}
# A server closes a keep-alive connection left idle for its timeout (vLLM's and httpx's default are
# both 5 s, so a request can go out on a connection the server is closing): drop them sooner.
IDLE_CONNECTION_S = 2.0
# vLLM's weight version until someone sets one: the server holds the model it started with.
NEVER_PUSHED = "default"
OURS, AS_STARTED, ANOTHERS = "this campaign's", "as started", "another campaign's"  # ServerGenerator.holds
START_HINT = "start it with `online-dpo serve MODEL` (dev mode and the scale-out endpoints on)"
SEEDED_CPU_HINT = ("; on a CPU server, seeded requests (servers.seed_requests) crash vLLM's engine when a prompt's "
                   "prefill is split over steps ('CPU Generator does not use offset' in its log): restart it with "
                   "--no-enable-chunked-prefill (`online-dpo serve` does), or set servers.seed_requests=false")


def api_key_from(api_key_env: str | None) -> str | None:
    """The servers' API key, from the environment variable servers.api_key_env names (None: no key).
    Only the variable's name is in the config, which the run directory keeps."""
    if api_key_env is None:
        return None
    key = os.environ.get(api_key_env)
    if not key:
        raise ConfigError(f"servers.api_key_env={api_key_env} names the environment variable holding the generation "
                          f"servers' API key, and {api_key_env} is not set (or empty) here; export {api_key_env} with "
                          f"the key the servers were started with (`online-dpo serve --api-key-env`), or set "
                          f"servers.api_key_env=null for servers that need none")
    return key


class Server:
    """One vLLM server's HTTP endpoints, with every failure turned into a GenerationServerError
    that names the server. With `api_key`, every request carries `Authorization: Bearer <key>`."""

    def __init__(self, url: str, timeout_s: float, api_key: str | None = None):
        import httpx

        self.url = url.rstrip("/")
        self.keyed = api_key is not None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key is not None else None
        self.client = httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout_s, connect=10.0), headers=headers,
                                   limits=httpx.Limits(keepalive_expiry=IDLE_CONNECTION_S))

    def request(self, method: str, path: str, **kwargs):
        import httpx

        try:
            try:
                response = self.client.request(method, path, **kwargs)
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
                # The server may have closed this pooled connection as the request went out. Every
                # request here may be sent twice (a seeded generate samples the same again); a
                # server that is down fails the second try too.
                response = self.client.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise GenerationServerError(self.url, f"{path} timed out after {self.client.timeout.read:.0f} s "
                                                  f"(servers.timeout_s)") from None
        except httpx.HTTPError as e:
            raise GenerationServerError(self.url, f"cannot reach it ({type(e).__name__}: {e}); is it running? "
                                                  f"{START_HINT}") from None
        if response.status_code == 401:
            raise GenerationServerError(self.url, f"{path} answered HTTP 401: the server requires an API key, and "
                                                  + ("refused the one in servers.api_key_env's variable: export the "
                                                     "key the server was started with" if self.keyed else
                                                     "none was sent: set servers.api_key_env to the environment "
                                                     "variable holding the key the server was started with"))
        if response.status_code >= 400:
            raise GenerationServerError(self.url, f"{path} answered HTTP {response.status_code}: "
                                                  f"{response.text[:300]}")
        return response.json() if response.content else None

    def routes(self) -> set[str]:
        return set(self.request("GET", "/openapi.json").get("paths", {}))

    def served_model(self) -> str:
        return self.request("GET", "/v1/models")["data"][0]["id"]

    def weight_version(self) -> str:
        return self.request("GET", "/weight_info")["weight_version"]

    def generate(self, token_ids: list[int], params: dict) -> dict:
        return self.request("POST", "/inference/v1/generate",
                            json={"token_ids": token_ids, "sampling_params": params, "output_mode": "tokens"})

    def pause(self) -> None:
        self.request("POST", "/pause", params={"mode": "wait"})  # in-flight requests finish first

    def resume(self) -> None:
        self.request("POST", "/resume")

    def reload_from(self, weights_path: str) -> None:
        self.request("POST", "/collective_rpc", json={"method": "reload_weights",
                                                       "kwargs": {"weights_path": weights_path}})

    def commit(self, version: str) -> None:
        """After a load: the stale prefix cache goes, the version label comes."""
        self.request("POST", "/reset_prefix_cache")
        self.request("POST", "/update_weight_version", json={"new_version": version})


@dataclass(frozen=True)
class Probe:
    """A fixed prompt + completion (token ids) and the policy's log-prob of each completion
    token: what a server's own log-probs are compared with."""

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]  # [len(completion_ids)]


def policy_probe(model: torch.nn.Module, tokenizer, autocast: torch.dtype | None = None, text: str = "What is 7 + 5?",
                 completion: str = "7 + 5 = 12. The answer is 12.") -> Probe:
    """The policy's per-token log-probs of a fixed completion, computed as the trainer computes
    them (under `autocast`, its mixed precision, where it has one)."""
    from contextlib import nullcontext

    from online_dpo.data.prompts import chat_prompt_ids

    prompt_ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": text}])
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + completion_ids], device=device)
    precision = torch.autocast(device.type, dtype=autocast) if autocast is not None else nullcontext()
    with torch.no_grad(), precision:
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].float()  # [completion, V]
    logprobs = logits.log_softmax(-1).gather(1, ids[0, len(prompt_ids):, None]).squeeze(1)
    return Probe(prompt_ids, completion_ids, logprobs.tolist())


def probe_gap(server: Server, probe: Probe) -> float:
    """Mean |server log-prob - policy log-prob| per completion token of the probe."""
    answer = server.generate(probe.prompt_ids + probe.completion_ids,
                             {"n": 1, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0})
    served = answer["prompt_logprobs"][len(probe.prompt_ids):]
    gaps = [abs(step[str(tok)]["logprob"] - lp) for step, tok, lp in zip(served, probe.completion_ids, probe.logprobs,
                                                                        strict=True)]
    return sum(gaps) / len(gaps)


class ServerGenerator:
    """The Generator over one or more vLLM servers (`engines.generate.Generator`).

    A call's prompts are split into contiguous shares, one per server, sent as one request per
    prompt (K samples each, at most `max_concurrent` in flight per server) and gathered back
    in prompt order. `version` is the label of the weights last pushed; every answer must
    come from it.
    """

    def __init__(self, urls: list[str], tokenizer, transport, *, probe_policy: Callable[[], Probe], tolerance: float,
                 label_prefix: str, timeout_s: float = 600.0, max_concurrent: int = 64, seed_requests: bool = True,
                 api_key_env: str | None = None):
        api_key = api_key_from(api_key_env)
        self.servers = [Server(url, timeout_s, api_key) for url in urls]
        self.tokenizer = tokenizer
        self.transport = transport
        self.probe_policy = probe_policy  # the trainer's policy, probed after every push
        self.tolerance = tolerance
        # Server-side labels are the campaign's own (`label_prefix` + version), so weights pushed
        # by another campaign never pass for this one's.
        self.label_prefix = label_prefix
        self.max_concurrent = max_concurrent
        self.seed_requests = seed_requests
        self.version: str | None = None
        self.probe_gaps: list[float] = []  # each server's probe gap after the last push
        # Held while a generate call must finish on the current weights (an asynchronous
        # round's candidates): a push waits for it.
        self.busy = threading.Lock()

    def holds(self, server: Server) -> str:
        """Whose weights the server holds: OURS (this campaign pushed them), AS_STARTED (nobody
        pushed any: the model it was started with) or ANOTHERS (another campaign pushed them)."""
        version = server.weight_version()
        return OURS if version.startswith(self.label_prefix) else AS_STARTED if version == NEVER_PUSHED else ANOTHERS

    def check(self, longest: int) -> None:
        """Every server is up, exposes the endpoints the loop needs, and fits `longest` tokens
        (prompt + response)."""
        for server in self.servers:
            missing = [f"{route} (needs {flag})" for route, flag in REQUIRED_ROUTES.items()
                       if route not in server.routes()]
            if missing:
                raise GenerationServerError(server.url, f"lacks {', '.join(missing)}; {START_HINT}")
            room = server.request("GET", "/v1/models")["data"][0].get("max_model_len")
            if room is not None and room < longest:
                raise GenerationServerError(server.url, f"holds at most {room} tokens per sequence, and the campaign "
                                                        f"needs {longest} (policy.max_prompt_tokens + max_new_tokens); "
                                                        f"restart it with --max-model-len {longest} or more")
            log.info("generation server %s serves %s (weights %s)", server.url, server.served_model(),
                     server.weight_version())

    def check_policy(self, probe: Probe, what: str, servers: list[Server] | None = None) -> list[float]:
        """Each server's probe gap; a gap above the tolerance means it does not hold the policy."""
        gaps = []
        for server in self.servers if servers is None else servers:
            gap = probe_gap(server, probe)
            if not math.isfinite(gap) or gap > self.tolerance:
                raise GenerationServerError(
                    server.url, f"does not hold {what}: its log-probs of a fixed completion differ from the policy's "
                                f"by {gap:.3f} nats per token (servers.probe_tolerance={self.tolerance}); a server "
                                f"must run the policy's model (`online-dpo serve <policy.model>`)")
            gaps.append(gap)
        return gaps

    def generate(self, prompts: list[Prompt], sampling: Sampling) -> list[list[Completion]]:
        ids = prompt_token_ids(self.tokenizer, prompts)
        owner = [server for k, server in enumerate(self.servers)
                 for _ in range(len(ids))[rank_share(len(ids), k, len(self.servers))]]

        def one(i: int) -> list[Completion]:
            params = {"n": sampling.n, "temperature": sampling.temperature, "top_p": sampling.top_p,
                      "max_tokens": sampling.max_new_tokens}
            if sampling.logprobs:
                params["logprobs"] = 0
            if self.seed_requests:
                params["seed"] = stable_seed(sampling.seed, i) % 2**31
            try:
                answer = owner[i].generate(ids[i], params)
            except GenerationServerError as e:
                if self.seed_requests and "HTTP 500" in e.problem:
                    raise GenerationServerError(e.url, e.problem + SEEDED_CPU_HINT) from None
                raise
            return self.completions(owner[i], answer, sampling)

        workers = self.max_concurrent * len(self.servers)
        with ThreadPoolExecutor(max_workers=min(workers, max(1, len(ids))), thread_name_prefix="generate") as pool:
            return list(pool.map(one, range(len(ids))))  # re-raises the first failure

    def completions(self, server: Server, answer: dict, sampling: Sampling) -> list[Completion]:
        out = []
        for choice in sorted(answer["choices"], key=lambda c: c["index"]):
            versions = {span["version"] for span in choice.get("weight_versions") or []}
            if versions != {self.label_prefix + self.version}:
                raise StaleWeightsError(server.url, f"answered with tokens sampled by weights {sorted(versions)}, "
                                                    f"not the pushed version {self.version!r}; the candidates are "
                                                    f"refused (resume regenerates the round)")
            tokens = choice["token_ids"]
            logprobs = [step["logprob"] for step in choice["logprobs"]["content"]] if sampling.logprobs else None
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            out.append(Completion(text, tokens, choice["finish_reason"] or "length", logprobs, self.version))
        return out

    def label(self, version: str, servers: list[Server] | None = None) -> None:
        """Name the weights servers hold now (at start: the initial model) without loading any."""
        for server in self.servers if servers is None else servers:
            server.request("POST", "/update_weight_version", json={"new_version": self.label_prefix + version})
        self.version = version

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: str) -> None:
        """Push the policy's weights to every server as `version` (pause, load, reset the prefix
        cache, label, resume), then check that each now answers as the trainer's policy does."""
        with self.busy:
            self._push(weights, version)
        self.probe_gaps = self.check_policy(self.probe_policy(), f"the pushed policy ({version})")
        log.info("pushed %s to %d server(s); probe gap %s nats/token", version, len(self.servers),
                 ", ".join(f"{g:.4f}" for g in self.probe_gaps))

    def _push(self, weights: Iterable[tuple[str, torch.Tensor]], version: str) -> None:
        for server in self.servers:
            server.pause()
        try:
            self.transport.push(self.servers, weights, version)
            for server in self.servers:
                server.commit(self.label_prefix + version)
        finally:
            for server in self.servers:
                server.resume()
        self.version = version
