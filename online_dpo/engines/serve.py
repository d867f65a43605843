"""`online-dpo serve MODEL`: a vLLM OpenAI-compatible server started with what
generation.backend=vllm_server needs (dev mode, the scale-out endpoints, the policy's
model, dtype, seed and context length, raw log-probs), and its wait until it answers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from online_dpo.errors import GenerationServerError

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


def server_command(model_path: str, *, host: str = "127.0.0.1", port: int = 8000, dtype: str = "auto",
                   seed: int = 0, max_model_len: int | None = None, kv_cache_gb: float | None = None,
                   extra: list[str] = ()) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of a server for `model_path` (a local HF folder).
    dtype auto: bfloat16 where the machine has native bf16, float32 elsewhere (hardware.py)."""
    import torch

    from online_dpo import hardware

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


def wait_ready(url: str, process: subprocess.Popen | None = None, timeout_s: float = 600.0) -> None:
    """Block until the server at `url` answers /health; fail if its process exits first."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise GenerationServerError(url, f"the server process exited with code {process.returncode} before it "
                                             f"was ready (see its log above)")
        try:
            if httpx.get(f"{url}/health", timeout=5.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
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
