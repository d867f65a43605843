"""Benchmark: a vLLM server's generation tokens/s on a CPU with the cores `online-dpo serve` gives
its worker against vLLM's own split (one core kept for its scheduler process), in one run.

Both servers are started by `online-dpo serve`'s launcher (`engines.serve.start_server`) on the
same model, one after the other, and each answers the same completion request (the same prompts,
K samples each, a fixed number of tokens: `ignore_eos`) `--repeats` times; the first answer of each
also warms the server. vLLM's own split is what the launcher leaves it with
VLLM_CPU_NUM_OF_RESERVED_CPU=1.

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


def measure(model: str, prompts: list[str], args, reserved: str | None) -> dict:
    """Start a server with VLLM_CPU_NUM_OF_RESERVED_CPU=`reserved` (None: as the launcher sets
    it) and time `args.repeats` answers to the same request."""
    import httpx

    from online_dpo import hardware
    from online_dpo.engines.serve import cpu_core_env, start_server, stop_server, wait_ready

    body = {"model": model, "prompt": prompts, "n": args.samples, "max_tokens": args.max_new_tokens,
            "temperature": 1.0, "ignore_eos": True}
    with mock.patch.dict(os.environ):  # the launcher reads the environment; restored on exit
        os.environ.pop("VLLM_CPU_NUM_OF_RESERVED_CPU", None)
        if reserved is not None:
            os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = reserved
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
    label = "vLLM's own split (one core for its scheduler)" if reserved is not None else "online-dpo serve"
    return {"server": label, "env_added": added, "ready_s": round(ready_s, 1),
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
    rows = [measure(model, prompts, args, reserved) for reserved in ("1", None)]
    for row in rows:
        print(json.dumps(row))
    own, serve = rows[0]["tokens_per_s"][-1], rows[1]["tokens_per_s"][-1]
    print(f"last repeat: {serve:.1f} vs {own:.1f} tokens/s = {serve / own:.2f}x with online-dpo serve's cores")
    if args.json:
        write_json(args.json, {"machine": {"cores": hardware.available_cores(), "fast_bf16": hw.fast_bf16},
                               "args": vars(args), "servers": rows, "ratio": serve / own})


if __name__ == "__main__":
    main()
