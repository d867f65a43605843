"""Benchmark: a vLLM server on a CPU as `online-dpo serve` starts it (on a small machine, the model
in vLLM's engine process on every core) against vLLM's own placement (the model in a worker
process, one core kept for the scheduler) and that worker on every core: time to ready and
generation tokens/s, in one run.

The three servers are started by `online-dpo serve`'s launcher (`engines.serve.start_server`) on
the same model, one after the other, and each answers the same completion request (the same
prompts, K samples each, a fixed number of tokens: `ignore_eos`) `--repeats` times; the first
answer of each also warms the server. The launcher leaves vLLM's own placement where
VLLM_CPU_NUM_OF_RESERVED_CPU is set (engines.serve.VLLM_CORE_SETTINGS).

    python bench/server_cores.py                       # the embedded model
    python bench/server_cores.py --model DIR --prompts 16 --samples 2

This is a benchmark, not a test: it asserts nothing and its numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import free_port, write_json  # noqa: E402


# (label, what the environment sets of engines.serve.VLLM_CORE_SETTINGS; the launcher adds the rest)
PLACEMENTS = [("vLLM's own: a worker process, one core for the scheduler", {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}),
              ("a worker process on every core", {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}),
              ("online-dpo serve", {})]


def measure(model: str, prompts: list[str], args, label: str, settings: dict[str, str]) -> dict:
    """Start a server with `settings` in its environment (and none of the launcher's other core
    settings) and time its start and `args.repeats` answers to the same request."""
    import httpx

    from online_dpo import hardware
    from online_dpo.engines.serve import VLLM_CORE_SETTINGS, cpu_core_env, start_server, stop_server, wait_ready

    body = {"model": model, "prompt": prompts, "n": args.samples, "max_tokens": args.max_new_tokens,
            "temperature": 1.0, "ignore_eos": True}
    with mock.patch.dict(os.environ):  # the launcher reads the environment; restored on exit
        for name in VLLM_CORE_SETTINGS:
            os.environ.pop(name, None)
        os.environ.update(settings)
        added = cpu_core_env(os.environ, hardware.available_cores())
        with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "server.log", "w+") as log:
            started = time.perf_counter()
            process, url = start_server(model, log_file=log, port=free_port(), max_model_len=args.max_model_len,
                                        kv_cache_gb=args.kv_cache_gb)
            try:
                wait_ready(url, process, timeout_s=600)
                ready_s = time.perf_counter() - started
                rates = []
                for repeat in range(args.repeats):
                    t = time.perf_counter()
                    reply = httpx.post(f"{url}/v1/completions", json={**body, "seed": repeat}, timeout=1800)
                    reply.raise_for_status()
                    rates.append(reply.json()["usage"]["completion_tokens"] / (time.perf_counter() - t))
            except Exception:
                log.seek(0)
                print(log.read()[-3000:], file=sys.stderr)
                raise
            finally:
                stop_server(process)
    return {"server": label, "env": {**settings, **added}, "ready_s": round(ready_s, 1),
            "tokens_per_s": [round(r, 1) for r in rates]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded", help="a local HF folder, or 'embedded'")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--kv-cache-gb", type=float, default=0.5)
    parser.add_argument("--json", type=Path, help="also write the rows and the ratio here")
    args = parser.parse_args()

    from judges.models import resolve_model_path
    from online_dpo import hardware
    from online_dpo.engines.models import load_tokenizer

    model = str(resolve_model_path(args.model))
    tokenizer = load_tokenizer(model)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": f"What is {i % 9 + 1} x {i % 7 + 2}? "
                                                                          "Explain."}],
                                             tokenize=False, add_generation_prompt=True) for i in range(args.prompts)]
    hw = hardware.Hardware.detect()
    print(f"machine: {hw.device}, {hardware.available_cores()} cores, bf16 native: {hw.fast_bf16}", flush=True)
    rows = [measure(model, prompts, args, label, settings) for label, settings in PLACEMENTS]
    for row in rows:
        print(json.dumps(row))
    own, serve = rows[0], rows[-1]
    ratio = serve["tokens_per_s"][-1] / own["tokens_per_s"][-1]
    print(f"online-dpo serve against vLLM's own placement: ready in {serve['ready_s']} s against {own['ready_s']} s; "
          f"last repeat {serve['tokens_per_s'][-1]:.1f} against {own['tokens_per_s'][-1]:.1f} tokens/s = {ratio:.2f}x")
    if args.json:
        write_json(args.json, {"machine": {"cores": hardware.available_cores(), "fast_bf16": hw.fast_bf16},
                               "args": vars(args), "servers": rows, "ratio": ratio})


if __name__ == "__main__":
    main()
