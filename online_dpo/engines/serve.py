"""`online-dpo serve MODEL`: a vLLM OpenAI-compatible server started with what
generation.backend=vllm_server needs (dev mode, the scale-out endpoints, the policy's
model, dtype, seed and context length, raw log-probs), and its wait until it answers.

Dev mode lets whoever reaches the port pause the server, run methods on its workers
(/collective_rpc) and load weights from any path on its disk. So a server that listens
beyond loopback must have an API key (`server_api_key`), and a keyed server requires it
on every path (`RequireApiKey`), not only on the paths vLLM's own --api-key guards.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import signal
import subprocess
import sys
import time

from online_dpo.errors import ConfigError, GenerationServerError

CPU_KV_CACHE_GB = 1.0  # vLLM's own KV sizing on a CPU counts the whole machine's memory
# On a CPU, vLLM's server runs its model in a worker process of its own and keeps one core for the
# scheduler beside it. Up to this many cores that core is a quarter of the machine or more, and the
# worker process one more interpreter to start: there the model runs inside the engine process, on
# every core (bench/server_cores.py measured both).
SMALL_CPU_CORES = 4
# Where the user set any of these, vLLM's own placement of the model on the cores is theirs.
VLLM_CORE_SETTINGS = ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_CPU_OMP_THREADS_BIND")


def cpu_core_env(environ: dict, cores: int) -> dict[str, str]:
    """What a CPU server's environment adds for its cores: on a machine of at most
    SMALL_CPU_CORES, the model in vLLM's engine process (VLLM_ENABLE_V1_MULTIPROCESSING=0: no
    worker process, no core kept for the scheduler) with OMP_NUM_THREADS threads, every core
    unless the environment already says how many; nothing where the user set VLLM_CORE_SETTINGS."""
    if cores > SMALL_CPU_CORES or set(VLLM_CORE_SETTINGS) & set(environ):
        return {}
    # Set, not left to torch's default: where it is unset, vLLM asks for one thread in a serving engine
    # (its CPU worker refuses that call today; a later version may not).
    return {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": environ.get("OMP_NUM_THREADS", str(cores))}


# Where `online-dpo serve` reads a server's API key unless --api-key-env names another variable.
DEFAULT_API_KEY_ENV = "ONLINE_DPO_SERVER_API_KEY"
# The variable the server process reads its key from: vLLM's own, so its --api-key check (on
# /v1, /v2, /inference, /cohere) applies too, while the key stays off the command line, which
# `ps` shows to every user of the machine.
SERVER_KEY_ENV = "VLLM_API_KEY"
# vLLM options that `online-dpo serve` sets itself, and what to use instead of passing them after --.
OWN_OPTIONS = {"--host": "online-dpo serve --host",
               "--api-key": "an environment variable (--api-key-env), which keeps the key off the command line"}


def is_loopback(host: str) -> bool:
    """Whether a server listening on `host` is reachable from this machine only (127.0.0.0/8,
    ::1, localhost). Any other name may resolve to an outside address, so it counts as outside."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def server_api_key(host: str, api_key_env: str | None = None, extra: list[str] = ()) -> str | None:
    """The API key a server listening on `host` will require: the value of the environment
    variable `api_key_env`, or with None, of DEFAULT_API_KEY_ENV where it is set. Refuses a
    server without a key on a host other than loopback, a named variable that is not set, and
    `extra` vLLM options that would override the address or put the key on the command line."""
    for option, instead in OWN_OPTIONS.items():
        if any(arg == option or arg.startswith(f"{option}=") for arg in extra):
            raise ConfigError(f"{option} after -- goes to vLLM unchecked; use {instead}")
    if api_key_env is not None:
        key = os.environ.get(api_key_env)
        if not key:
            raise ConfigError(f"--api-key-env {api_key_env}: the environment variable {api_key_env} is not set (or "
                              f"empty); export {api_key_env}=<a long random secret> and give the trainer the same "
                              f"variable (servers.api_key_env={api_key_env})")
        return key
    key = os.environ.get(DEFAULT_API_KEY_ENV) or None
    if key is None and not is_loopback(host):
        raise ConfigError(
            f"online-dpo serve --host {host} listens beyond this machine without an API key, and the server runs "
            f"vLLM's dev mode: anyone who reaches the port could pause it, run methods on its workers "
            f"(/collective_rpc) and load weights from any path on its disk. Export {DEFAULT_API_KEY_ENV}=<a long "
            f"random secret> (or name another variable with --api-key-env) and give the trainer the same variable "
            f"(servers.api_key_env={DEFAULT_API_KEY_ENV}), or listen on 127.0.0.1 only")
    return key


class RequireApiKey:
    """The ASGI middleware a keyed server runs (vLLM's --middleware): every request, on every
    path, must carry `Authorization: Bearer <key>`, the key in SERVER_KEY_ENV. vLLM's own
    --api-key guards only /v1, /v2, /inference and /cohere, which leaves dev mode's
    /collective_rpc, /pause, /update_weights and the rest open. OPTIONS requests pass, as in
    vLLM's check: a browser's CORS preflight carries no credentials."""

    def __init__(self, app):
        key = os.environ.get(SERVER_KEY_ENV)
        if not key:  # fail closed: a server meant to be keyed never starts open
            raise RuntimeError(f"online_dpo.engines.serve.RequireApiKey needs the API key in {SERVER_KEY_ENV}")
        self.app = app
        self.key_digest = hashlib.sha256(key.encode()).digest()

    def authorized(self, scope) -> bool:
        headers = dict(scope.get("headers") or [])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        # digests compared in constant time: the time taken says nothing about the key
        return scheme.lower() == "bearer" and hmac.compare_digest(hashlib.sha256(token.encode()).digest(),
                                                                  self.key_digest)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or scope.get("method") == "OPTIONS" or self.authorized(scope):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # before the handshake: HTTP 403
        else:
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
            await send({"type": "http.response.body", "body": b'{"error": "Unauthorized: this server requires an '
                                                              b'API key (Authorization: Bearer <key>)"}'})


def server_command(model_path: str, *, host: str = "127.0.0.1", port: int = 8000, dtype: str = "auto",
                   seed: int = 0, max_model_len: int | None = None, kv_cache_gb: float | None = None,
                   api_key_env: str | None = None, extra: list[str] = ()) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of a server for `model_path` (a local HF folder).
    dtype auto: bfloat16 where the machine has native bf16, float32 elsewhere (hardware.py).
    The API key (`server_api_key`) goes into the environment, never onto the command line."""
    import torch

    from online_dpo import hardware

    api_key = server_api_key(host, api_key_env, extra)
    hw = hardware.Hardware.detect()
    if dtype == "auto":
        dtype = hardware.resolve_generation_dtype("auto", "vllm", hw).value
    # `vllm serve` fails on vllm-cpu's package metadata; the module entry point is the same server.
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path, "--host", host,
            "--port", str(port), "--dtype", dtype, "--seed", str(seed), "--enable-scale-out",
            # the sampled tokens' log-probs before temperature / top-p: the policy's own log π
            "--logprobs-mode", "raw_logprobs"]
    if max_model_len:
        argv += ["--max-model-len", str(max_model_len)]
    on_gpu = torch.cuda.is_available()
    if kv_cache_gb is None and not on_gpu:
        kv_cache_gb = CPU_KV_CACHE_GB
    if kv_cache_gb:
        argv += ["--kv-cache-memory-bytes", str(int(kv_cache_gb * 2**30))]
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}  # /pause, /resume, /collective_rpc, weight versions
    if api_key is not None:
        env[SERVER_KEY_ENV] = api_key
        argv += ["--middleware", f"{__name__}.{RequireApiKey.__name__}"]
    if not on_gpu:
        argv.append("--enforce-eager")  # no graph capture on a CPU
        if "--block-size" not in extra:  # the samples of a prompt share its prefill (hardware.resolve_kv_block_tokens)
            argv += ["--block-size", str(hardware.CPU_KV_BLOCK_TOKENS)]
        # A seeded request whose prompt's prefill is split over steps rewinds its generator's
        # offset, which a CPU generator cannot do: the engine dies. Whole prefills avoid it.
        argv.append("--no-enable-chunked-prefill")
        env.update(cpu_core_env(os.environ, hardware.available_cores()))
    return argv + list(extra), env


def start_server(model_path: str, log_file=None, **options) -> tuple[subprocess.Popen, str]:
    """Start a server (`server_command`) in the background: (process, its base URL). It leads
    its own process group, so `stop_server` also reaches vLLM's engine processes."""
    argv, env = server_command(model_path, **options)
    process = subprocess.Popen(argv, env=env, stdout=log_file, stderr=subprocess.STDOUT if log_file else None,
                               start_new_session=True)
    host, port = options.get("host", "127.0.0.1"), options.get("port", 8000)
    return process, f"http://{host}:{port}"


def wait_ready(url: str, process: subprocess.Popen | None = None, timeout_s: float = 600.0,
               api_key: str | None = None) -> None:
    """Block until the server at `url` answers /health (with `api_key`, where it has one); fail
    if its process exits first."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise GenerationServerError(url, f"the server process exited with code {process.returncode} before it "
                                             f"was ready (see its log above)")
        try:
            status = httpx.get(f"{url}/health", headers=headers, timeout=5.0).status_code
        except httpx.HTTPError:
            status = None
        if status == 200:
            return
        if status == 401:
            raise GenerationServerError(url, "answered /health with HTTP 401: it requires an API key, and "
                                             + ("refused the one given" if api_key else "none was given"))
        time.sleep(1.0)
    raise GenerationServerError(url, f"not ready after {timeout_s:.0f} s")


def stop_server(process: subprocess.Popen, sig: int = signal.SIGTERM, wait_s: float = 30.0) -> None:
    """Stop a server from `start_server` and its engine processes (SIGKILL if SIGTERM is not enough)."""
    try:
        os.killpg(process.pid, sig)
        process.wait(timeout=wait_s)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    try:  # the engine processes may outlive the server process by a moment
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
