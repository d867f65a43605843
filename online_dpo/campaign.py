"""The round loop. It only calls the stages, in order, and records what each produced.

    for r in rounds:
        prompts    = split.round_prompts(r)
        candidates = generator.generate(prompts, K)
        scores     = judge the K candidates of each prompt
        pairs      = best vs worst of K, ties dropped
        reference  = log-probs of the pairs under the policy before the update
        policy     = DPO update
        generator.update_weights(policy)
        eval       = held-out win rate vs the round-0 policy (and vs round r-1)
        checkpoint

Each stage's outputs go to runs/<name>/round_XXX/ and its marker to the manifest.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from judges import as_pairwise, load_judge
from judges.ranking import CandidateGroup, score_groups
from online_dpo import diversity, dpo, evaluate, hardware, labels, lora, report, training
from online_dpo.config import CampaignConfig, ConfigError
from online_dpo.data import chat_prompt_ids, load_prompts
from online_dpo.generate import Completion, HFGenerator, Sampling, VLLMGenerator
from online_dpo.models import load_policy, load_tokenizer, resolve_model_path
from online_dpo.pairs import Candidate, Funnel, replay_pairs, select_pairs
from online_dpo.rundir import RunDir, atomic_path, read_jsonl, read_parquet, write_json, write_jsonl, write_parquet

log = logging.getLogger("online_dpo")
JUDGE_CHUNK = 16  # prompts per judge call


def derived_seed(*parts: object) -> int:
    """A stable 31-bit seed from a tuple (Python's hash() is salted per process)."""
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


@contextmanager
def timed(stage: str, timings: dict):
    t0 = time.perf_counter()
    yield
    timings[stage] = time.perf_counter() - t0
    log.info("%-10s %.1fs", stage, timings[stage])


@dataclass
class Campaign:
    """What the loop holds between rounds (built once by `setup`).

    Under several processes (`torch.distributed.run` / `accelerate launch`) only the main
    process generates, judges, evaluates and writes the run directory; every process
    reads the round's pairs back from disk and takes part in the reference pass and the
    update. `judge` and `generator` are None on the other processes.
    """

    cfg: CampaignConfig
    run: RunDir
    accelerator: object
    tokenizer: object
    split: object
    judge: object | None
    policy: torch.nn.Module
    optimizer: torch.optim.Optimizer
    generator: object | None
    reference_model: torch.nn.Module | None  # dpo.reference=initial without LoRA: the frozen round-0 model
    resolved: hardware.Resolution  # every hardware-dependent `auto`, as resolved for this machine
    model_path: str  # the initial model's folder

    @property
    def reference_source(self) -> str:
        """Where the reference log-probs come from: "forward" (a pass of the reference model),
        "generation" (the candidates' own token log-probs; see dpo.reference_logps) or "none"."""
        return self.resolved.reference_logps.value

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def barrier(self) -> None:
        """Wait for every process, then re-read the manifest the main process may have moved on."""
        self.accelerator.wait_for_everyone()
        if not self.is_main:
            self.run.reload()


def setup(cfg: CampaignConfig, run: RunDir) -> Campaign:
    from accelerate import Accelerator

    resolved = hardware.resolve(cfg)
    accelerator = Accelerator(mixed_precision=resolved.mixed_precision.value, cpu=resolved.hardware.device == "cpu")
    main = accelerator.is_main_process
    if not main:
        log.setLevel(logging.WARNING)  # one copy of the progress log, from the main process
    for line in resolved.lines():
        log.info("%s", line)
    if resolved.mixed_precision.value == "bf16" and not resolved.hardware.fast_bf16:
        log.warning("dpo.mixed_precision=bf16 on a machine without native bf16: the update is emulated and runs "
                    "far slower than float32 (dpo.mixed_precision=auto picks float32 here)")
    model_path = resolve_model_path(cfg.policy.model)
    tokenizer = load_tokenizer(model_path)
    # Over-long prompts (after the chat template) are skipped or rejected here, per data.on_too_long.
    split = load_prompts(cfg.data, tokenizer, cfg.policy.max_prompt_tokens)
    if main:
        write_json(run.root / "data.json", split.report.as_dict())
        log.info("%s", split.report.summary())
    split.round_prompts(cfg.rounds - 1, cfg.data.train_prompts_per_round)  # fail now, not in round N
    judge = load_judge(cfg.judge.name, **cfg.judge.options) if main else None

    last = last_checkpoint(run, cfg.rounds)
    if last:
        log.info("resuming from %s", last)
    policy = build_policy(cfg, model_path, last)
    if cfg.dpo.gradient_checkpointing:
        training.enable_gradient_checkpointing(policy)
    optimizer = training.build_optimizer(policy, cfg.dpo)
    training.configure_deepspeed(accelerator, cfg.dpo)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    if guard_mode(cfg) != "off" and accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):
        raise ConfigError(f"guard.on_loss={guard_mode(cfg)} rolls a rejected round back by loading the previous "
                          f"policy's full weights, which a sharded ({accelerator.distributed_type.value}) policy cannot "
                          f"take here; set guard.on_loss=off, or use DDP / one process")
    if cfg.dpo.optimizer_state == "carry" and last:
        training.load_optimizer_state(optimizer, last, accelerator)

    reference_model = None
    if cfg.dpo.reference == "initial" and not cfg.lora.enabled:
        # Held frozen beside the policy (one more copy of the weights). With LoRA the initial
        # model is the policy with its adapter switched off; with the default "refreshed"
        # the reference pass runs on the policy itself before it is updated.
        reference_model = load_policy(model_path).to(accelerator.device).eval().requires_grad_(False)

    c = Campaign(cfg, run, accelerator, tokenizer, split, judge, policy, optimizer, None, reference_model, resolved,
                 model_path)
    log.info("reference log-probs: %s (dpo.reference_logps=%s)", c.reference_source, cfg.dpo.reference_logps)
    if cfg.generation.backend == "vllm" and main:
        gen_cfg = dataclasses.replace(cfg.generation, dtype=resolved.generation_dtype.value,
                                      kv_cache_gb=resolved.kv_cache_gb.value)
        max_len = cfg.policy.max_prompt_tokens + max(gen_cfg.max_new_tokens, cfg.eval.max_new_tokens)
        # the largest single generate call: a round's candidates, the held-out eval, or the diversity samples
        max_sequences = max(cfg.data.train_prompts_per_round * gen_cfg.samples_per_prompt, cfg.data.eval_prompts,
                            cfg.eval.diversity_prompts * cfg.eval.diversity_samples)
        c.generator = VLLMGenerator(model_path, tokenizer, gen_cfg, max_model_len=max_len, seed=cfg.seed,
                                    max_sequences=max_sequences)
        if c.generator.kv_cache_bytes:
            log.info("vLLM KV cache %.2f GiB (generation.kv_cache_gb=%s; the largest call holds %d sequences of <= %d tokens)",
                     c.generator.kv_cache_bytes / 2**30, gen_cfg.kv_cache_gb, max_sequences, max_len)
    elif main:
        c.generator = HFGenerator(accelerator.unwrap_model(policy), tokenizer, cfg.generation.hf_batch_sequences)
    if main:
        kv_bytes = getattr(c.generator, "kv_cache_bytes", None)
        run.record_resolution({**resolved.as_dict(), "vllm_kv_cache_bytes": kv_bytes})
    if last and cfg.generation.backend == "vllm":
        weights = policy_weights(c)  # a collective under FSDP/ZeRO-3: every process calls it
        if main:
            c.generator.update_weights(weights)
    return c


def build_policy(cfg: CampaignConfig, model_path: str, checkpoint: Path | None) -> torch.nn.Module:
    """The policy as saved in a round's `checkpoint` folder, or the initial model when None.
    With LoRA the checkpoint's adapter goes back on the initial weights (the checkpoint's
    model.safetensors holds the merged weights, for vLLM and for people), or a new adapter is
    made, seeded, so the same run starts from the same adapter."""
    policy = load_policy(str(checkpoint) if checkpoint and not cfg.lora.enabled else model_path)
    if cfg.lora.enabled:
        torch.manual_seed(derived_seed(cfg.seed, "lora-init"))
        policy = lora.wrap_lora(policy, cfg.lora, adapter_dir=checkpoint / lora.ADAPTER_DIR if checkpoint else None)
    return policy


def policy_weights(c: Campaign) -> list[tuple[str, torch.Tensor]] | None:
    """The policy's full weights under plain HF names (LoRA merged) on the main process, None elsewhere.
    Every process must call it: gathering a sharded (FSDP/ZeRO-3) state dict is a collective."""
    full = c.accelerator.get_state_dict(c.policy)
    return lora.merged_weights(c.accelerator.unwrap_model(c.policy), full) if c.is_main else None


def guard_mode(cfg: CampaignConfig) -> str:
    """guard.on_loss resolved: off, retry or stop."""
    return cfg.guard.resolved(cfg.eval.enabled and cfg.eval.compare_previous)


def accepted(run: RunDir, r: int) -> bool:
    """Whether round r's policy was kept: not rejected by the round guard (guard.on_loss)."""
    return run.manifest["rounds"].get(str(r), {}).get("eval", {}).get("accepted", True)


def last_accepted_round(run: RunDir, rounds: int) -> int | None:
    """The newest round whose update is saved and that the round guard did not reject: the
    policy the campaign continues from (None: the initial model)."""
    return next((r for r in reversed(range(rounds)) if run.is_done(r, "checkpoint") and accepted(run, r)), None)


def last_checkpoint(run: RunDir, rounds: int):
    r = last_accepted_round(run, rounds)
    if r is None:
        return None
    path = run.round_dir(r) / "checkpoint"
    return path if (path / "config.json").exists() else None


# --- stages ---------------------------------------------------------------------------

def completion_rows(prompts, completions: list[list[Completion]]) -> list[dict]:
    return [{"prompt_id": p.id, "index": i, "text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
             "token_logprobs": c.logprobs}
            for p, cs in zip(prompts, completions) for i, c in enumerate(cs)]


def rows_to_candidates(prompts, rows: list[dict]) -> list[list[Candidate]]:
    by_prompt: dict[str, list[Candidate]] = {p.id: [] for p in prompts}
    for row in rows:
        logprobs = row.get("token_logprobs")  # absent in runs saved before they were kept
        by_prompt[row["prompt_id"]].append(Candidate(row["prompt_id"], row["index"], row["text"],
                                                     list(row["token_ids"]), row["finish_reason"],
                                                     list(logprobs) if logprobs is not None else None))
    return [sorted(by_prompt[p.id], key=lambda c: c.index) for p in prompts]


def generate_eval(c: Campaign, seed: int, save_to=None) -> tuple[list[str], list[int]]:
    """One response per held-out prompt: (texts, token counts), also saved as JSONL to `save_to` if given."""
    sampling = Sampling(1, c.cfg.eval.temperature, 1.0, c.cfg.eval.max_new_tokens, seed)
    outs = c.generator.generate(c.split.eval, sampling)
    texts, lengths = [o[0].text for o in outs], [len(o[0].token_ids) for o in outs]
    if save_to is not None:
        write_jsonl(save_to, [{"prompt_id": p.id, "text": t, "tokens": n} for p, t, n in zip(c.split.eval, texts, lengths)])
    return texts, lengths


def measure_diversity(c: Campaign, seed: int, save_to) -> dict | None:
    """The diversity watch: eval.diversity_samples samples for each of the first
    eval.diversity_prompts held-out prompts, with their log-probs -> `diversity.diversity_metrics`.
    The samples are saved as JSONL to `save_to`. None when the watch is off."""
    e = c.cfg.eval
    prompts = c.split.eval[: e.diversity_prompts]
    if not prompts:
        return None
    sampling = Sampling(e.diversity_samples, e.temperature, 1.0, e.max_new_tokens, seed, logprobs=True)
    outs = c.generator.generate(prompts, sampling)
    write_jsonl(save_to, [{"prompt_id": p.id, "index": i, "text": o.text, "token_ids": o.token_ids, "logprobs": o.logprobs}
                          for p, samples in zip(prompts, outs) for i, o in enumerate(samples)])
    return diversity.diversity_metrics([[o.text for o in samples] for samples in outs],
                                       [[o.logprobs for o in samples] for samples in outs])


def baseline(c: Campaign) -> dict:
    """The round-0 policy's eval responses and diversity: measured once, reused by every round."""
    root = c.run.root / "baseline"
    if c.run.is_done("baseline", "eval"):
        texts = [row["text"] for row in read_jsonl(root / "eval_responses.jsonl")]
        done = c.run.manifest["rounds"]["baseline"]
        base = {"texts": texts, "accuracy": done["eval"]["accuracy"]}
    else:
        texts, _ = generate_eval(c, derived_seed(c.cfg.seed, "baseline-eval"), save_to=root / "eval_responses.jsonl")
        acc = evaluate.accuracy(c.split.eval, texts)
        c.run.mark_done("baseline", "eval", accuracy=acc)
        base = {"texts": texts, "accuracy": acc}
    if c.cfg.eval.enabled and c.cfg.eval.diversity_prompts:
        if not c.run.is_done("baseline", "diversity"):
            if last_checkpoint(c.run, c.cfg.rounds) is not None:
                # A run started before the diversity watch existed: the generator now holds a later
                # round's weights, so measuring "the initial policy" here would measure the wrong one.
                log.warning("this run has no diversity measurement of its initial policy (it was started before "
                            "the diversity watch existed); the diversity watch is off for it")
                return base
            metrics = measure_diversity(c, derived_seed(c.cfg.seed, "baseline-diversity"), root / "diversity_samples.jsonl")
            c.run.mark_done("baseline", "diversity", metrics=metrics)
        base["diversity"] = c.run.manifest["rounds"]["baseline"]["diversity"]["metrics"]
    return base


def run_round(c: Campaign, r: int, base: dict, prev_texts: list[str] | None) -> dict | None:
    """One round, stage by stage; a stage whose marker is in the manifest is read back, not redone.
    Returns the round's result on the main process, None on the others."""
    timings: dict[str, float] = {}
    if c.is_main:
        stats_before = copy.deepcopy(getattr(c.judge, "stats", None))
        prompts = c.split.round_prompts(r, c.cfg.data.train_prompts_per_round)
        write_jsonl(c.run.round_dir(r) / "prompts.jsonl", [p.to_record() for p in prompts])
        if overlaps_judging(c) and not c.run.is_done(r, "generate"):
            candidates, scores = stage_generate_while_judging(c, r, prompts, timings)
        else:
            with timed("generate", timings):
                candidates = stage_generate(c, r, prompts)
            with timed("judge", timings):
                scores = stage_judge(c, r, prompts, candidates)
        funnel = stage_pairs(c, r, prompts, candidates, scores)
    c.barrier()
    train_metrics, drift = stage_update(c, r, timings)
    if not c.run.is_done(r, "checkpoint"):
        with timed("checkpoint", timings):
            save_checkpoint(c, r)
    if not c.is_main:
        c.barrier()  # while the main process evaluates
        return None

    trained = {"examples": funnel.examples} if isinstance(funnel, labels.LabelFunnel) else {"pairs": funnel.pairs}
    result = {"round": r, **trained, "replayed": funnel.replayed, "funnel": funnel.as_dict()}
    if c.cfg.eval.enabled:
        with timed("eval", timings):
            result["eval"] = stage_eval(c, r, base, prev_texts)
    if train_metrics:
        last = train_metrics[-1]
        result["train"] = {"steps": len(train_metrics), "final_loss": last["loss"],
                           "final_reward_margin": last["reward_margin"], "final_kl": last.get("kl"),
                           "final_pair_accuracy": last.get("pair_accuracy"),
                           "train_tokens_per_s": last["train_tokens_per_s"], "logp_drift": drift}
    if stats_before is not None:  # API judges: this round's requests, cache hits, cost, position consistency
        result["judge_stats"] = c.judge.stats.since(stats_before).as_dict()
    if hasattr(c.judge, "protocol"):  # LLM judges: which templates (by hash) produced this round's verdicts
        result["judge_templates"] = c.judge.protocol.templates()
    result["timings"] = timings
    result["wall_s"] = sum(timings.values())
    if guard_mode(c.cfg) != "off":
        result["guard"] = report.guard_verdict(result["eval"], against_previous=prev_texts is not None)
    write_json(c.run.round_dir(r) / "eval.json", result)
    c.run.mark_done(r, "eval", wall_s=result["wall_s"], accepted=result.get("guard", {}).get("accepted", True))
    c.barrier()
    return result


def stage_generate(c: Campaign, r: int, prompts) -> list[list[Candidate]]:
    """K samples per prompt from the current policy -> candidates.parquet."""
    path = c.run.round_dir(r) / "candidates.parquet"
    if c.run.is_done(r, "generate"):
        return rows_to_candidates(prompts, read_parquet(path))
    log.info("round %d generate: %d prompts x %d samples", r, len(prompts), c.cfg.generation.samples_per_prompt)
    rows = completion_rows(prompts, c.generator.generate(prompts, train_sampling(c, r)))
    save_candidates(c, r, rows)
    return rows_to_candidates(prompts, rows)


def train_sampling(c: Campaign, r: int, *slice_index: int) -> Sampling:
    """The K-candidate sampling of round r (of one slice of it, when judging overlaps generation)."""
    g = c.cfg.generation
    return Sampling(g.samples_per_prompt, g.temperature, g.top_p, g.max_new_tokens,
                    derived_seed(c.cfg.seed, r, "train-generate", *slice_index),
                    logprobs=c.reference_source == "generation")


def save_candidates(c: Campaign, r: int, rows: list[dict]) -> None:
    write_parquet(c.run.round_dir(r) / "candidates.parquet", rows)
    c.run.mark_done(r, "generate", candidates=len(rows))


def stage_judge(c: Campaign, r: int, prompts, candidates) -> list[list[float | None]]:
    """A score (or None: judge error) per candidate -> judgments.parquet.

    Paid judges cache every reply as it arrives, so a crash mid-stage repeats no call.
    """
    path = c.run.round_dir(r) / "judgments.parquet"
    if c.run.is_done(r, "judge"):
        judged = read_parquet(path)
    else:
        judged = save_judgments(c, r, prompts, candidates, judge_candidates(c, r, prompts, candidates))
    return scores_of(judged, candidates)


def judge_candidates(c: Campaign, r: int, prompts, candidates, part: str = "") -> list[list]:
    """The judge's `Score` for every candidate, in chunks of JUDGE_CHUNK prompts, so a slow
    judge (an API, a local LLM) shows progress as it goes."""
    groups = [CandidateGroup(p.text, [x.text for x in cs], p.reference) for p, cs in zip(prompts, candidates)]
    scores = []
    chunks = range(0, len(groups), JUDGE_CHUNK)
    for n, i in enumerate(tqdm(chunks, desc=f"round {r} judging{part}", unit="chunk", leave=False)):
        log.info("round %d judge%s: chunk %d/%d", r, part, n + 1, len(chunks))
        scores += score_groups(c.judge, groups[i : i + JUDGE_CHUNK])[0]
    return scores


def save_judgments(c: Campaign, r: int, prompts, candidates, scores) -> list[dict]:
    judged = [{"prompt_id": p.id, "index": x.index, "score": s.value, "error": s.error, "raw": s.raw}
              for p, cs, ss in zip(prompts, candidates, scores) for x, s in zip(cs, ss)]
    write_parquet(c.run.round_dir(r) / "judgments.parquet", judged)
    c.run.mark_done(r, "judge", errors=sum(j["error"] is not None for j in judged))
    return judged


def scores_of(judged: list[dict], candidates) -> list[list[float | None]]:
    score_of = {(j["prompt_id"], j["index"]): j["score"] for j in judged}
    return [[score_of[(x.prompt_id, x.index)] for x in cs] for cs in candidates]


def overlaps_judging(c: Campaign) -> bool:
    """judge.overlap_generation: auto = for judges that wait on a remote API (`remote = True`)."""
    choice = c.cfg.judge.overlap_generation
    return bool(getattr(c.judge, "remote", False)) if choice == "auto" else bool(choice)


def stage_generate_while_judging(c: Campaign, r: int, prompts, timings: dict):
    """Generate and judge at once: the round's prompts go to the generator in
    judge.overlap_chunks slices, and each slice is judged in a background thread while the
    next one generates, so a remote judge's latency hides behind generation. Writes the
    same candidates.parquet and judgments.parquet, with the same markers, as the two stages
    one after the other. Each slice has its own seed, so a resumed round regenerates the same
    candidates and a caching judge answers them from its cache. timings: "generate" is the
    generation wall time, "judge" the wait for the judge after the last slice."""
    from concurrent.futures import ThreadPoolExecutor

    g = c.cfg.generation
    size = -(-len(prompts) // c.cfg.judge.overlap_chunks)
    slices = [prompts[i:i + size] for i in range(0, len(prompts), size)]
    log.info("round %d generate: %d prompts x %d samples in %d slices, each judged while the next generates",
             r, len(prompts), g.samples_per_prompt, len(slices))
    rows, futures = [], []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="judge") as pool:
        with timed("generate", timings):
            for k, part in enumerate(slices):
                part_rows = completion_rows(part, c.generator.generate(part, train_sampling(c, r, k)))
                rows += part_rows
                futures.append(pool.submit(judge_candidates, c, r, part, rows_to_candidates(part, part_rows),
                                           f" (slice {k + 1}/{len(slices)})"))
            save_candidates(c, r, rows)
        with timed("judge", timings):  # only the wait after the last slice: the rest overlapped generation
            scores = [s for f in futures for s in f.result()]  # re-raises a judge error (e.g. its budget)
            candidates = rows_to_candidates(prompts, rows)
            judged = save_judgments(c, r, prompts, candidates, scores)
    return candidates, scores_of(judged, candidates)


def stage_pairs(c: Campaign, r: int, prompts, candidates, scores) -> Funnel | labels.LabelFunnel:
    """The round's training data: fresh preference pairs -> pairs/ (an HF dataset, TRL's
    conversational format) or, for an unpaired loss (KTO), fresh labelled examples ->
    examples/ (TRL's unpaired format); the draw from earlier rounds' -> replay.jsonl; and the
    funnel of what was kept and dropped -> funnel.json. Selection, labelling and replay are
    pure functions of saved inputs and seeds, so on resume they are recomputed and equal what
    was saved.
    """
    rdir = c.run.round_dir(r)
    if dpo.is_unpaired(c.cfg.dpo.loss):
        fresh, funnel = labels.label_candidates(prompts, candidates, scores, c.cfg.kto)
    else:
        fresh, funnel = select_pairs(prompts, candidates, scores, c.cfg.pairs, seed=derived_seed(c.cfg.seed, r, "pairs"))
    replayed = replayed_pairs(c, r, len(fresh))
    funnel.replayed = len(replayed)
    if not c.run.is_done(r, "pairs"):
        from datasets import Dataset

        with atomic_path(rdir / data_dir_name(c), is_dir=True) as tmp:
            Dataset.from_list(fresh).save_to_disk(str(tmp))
        write_jsonl(rdir / "replay.jsonl", [{k: p[k] for k in replay_keys(c)} for p in replayed])
        write_json(rdir / "funnel.json", funnel.as_dict())
        c.run.mark_done(r, "pairs", pairs=len(fresh), replayed=len(replayed))
    log.info("round %d %s: %s", r, data_dir_name(c), funnel.summary())
    return funnel


def data_dir_name(c: Campaign) -> str:
    """Where a round's fresh training data lives: pairs/, or examples/ for an unpaired loss (KTO)."""
    return "examples" if dpo.is_unpaired(c.cfg.dpo.loss) else "pairs"


def replay_keys(c: Campaign) -> tuple[str, ...]:
    """What replay.jsonl records of each replayed record: enough to find it in its round."""
    return ("replay_from_round", "prompt_id", "index") if dpo.is_unpaired(c.cfg.dpo.loss) else REPLAY_KEYS


REPLAY_KEYS = ("replay_from_round", "prompt_id", "chosen_index", "rejected_index")


def round_pairs(c: Campaign, r: int) -> list[dict]:
    """Round r's fresh pairs (or labelled examples, for KTO), read back from its run directory.
    The manifest's "pairs" marker counts either."""
    from datasets import load_from_disk

    if c.run.manifest["rounds"][str(r)]["pairs"]["pairs"] == 0:
        return []  # `datasets` saves an empty dataset but cannot load one back
    return load_from_disk(str(c.run.round_dir(r) / data_dir_name(c))).to_list()


def replayed_pairs(c: Campaign, r: int, fresh_count: int) -> list[dict]:
    """With pairs.replay_fraction > 0: a seeded draw from earlier rounds' pairs (examples) for this update."""
    if c.cfg.pairs.replay_fraction <= 0 or r == 0 or fresh_count == 0:
        return []
    earlier = [round_pairs(c, q) for q in range(r)]
    return replay_pairs(earlier, fresh_count, c.cfg.pairs.replay_fraction, derived_seed(c.cfg.seed, r, "replay"))


def training_set(c: Campaign, r: int) -> list[dict]:
    """The round's update data, read from the run directory: fresh pairs (examples) + replayed ones."""
    fresh = round_pairs(c, r)
    return fresh + replayed_pairs(c, r, len(fresh))


def stage_update(c: Campaign, r: int, timings: dict) -> tuple[list[dict], dict | None]:
    """Reference pass, DPO update, likelihood drift and weight sync (all processes); skipped,
    results read back, once the round's checkpoint is saved. Returns the per-step training
    metrics and the drift of the trained pairs' log-likelihoods (`dpo.logp_drift`; None for
    reference-free and unpaired losses)."""
    rdir = c.run.round_dir(r)
    if c.run.is_done(r, "checkpoint"):  # resumed after this round's update was saved
        metrics = read_jsonl(rdir / "train_metrics.jsonl") if (rdir / "train_metrics.jsonl").exists() else []
        drift_path = rdir / "logp_drift.json"
        return metrics, json.loads(drift_path.read_text()) if drift_path.exists() else None
    pairs = training_set(c, r)  # every process reads the same pairs back from disk
    if not pairs:
        log.warning("round %d produced no pairs; the policy is unchanged", r)
        return [], None
    cfg, acc = c.cfg, c.accelerator
    unpaired = dpo.is_unpaired(cfg.dpo.loss)
    prompt_ids = {p["prompt_id"]: chat_prompt_ids(c.tokenizer, p["prompt"]) for p in pairs}
    make = dpo.make_example_batches if unpaired else dpo.make_batches
    batches = make(pairs, prompt_ids, cfg.dpo, c.tokenizer.pad_token_id, derived_seed(cfg.seed, r, "batches"),
                   num_processes=acc.num_processes)
    if unpaired and c.is_main:
        check_kto_balance(c, r, pairs)
    order = dpo.batch_order(len(pairs), derived_seed(cfg.seed, r, "batches"), acc.num_processes)  # make's order
    ref = None  # reference-free losses (simpo, orpo): no reference pass, no reference_logps.jsonl
    if dpo.needs_reference(cfg.dpo.loss):
        with timed("reference", timings):
            ref = generation_reference(c, r, pairs, prompt_ids, order) or reference_pass(c, batches)
    if c.is_main and ref is not None:  # which reference scored which pair, for people and for tests of dpo.reference
        write_jsonl(rdir / "reference_logps.jsonl", reference_rows(pairs, order, ref, unpaired))
    with timed("update", timings):
        if cfg.dpo.optimizer_state == "fresh":
            training.reset_optimizer_state(c.optimizer)  # new moments each round: the pairs are new data
        bar = tqdm(desc=f"round {r} update ({cfg.dpo.loss})", unit="step", leave=False, disable=not c.is_main)

        def progress(m: dict) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.3f}")
            if c.is_main:
                log.info("round %d update: step %d loss %.4f margin %.4f kl %.4f", r, m["step"] + 1, m["loss"],
                         m["reward_margin"], m.get("kl", float("nan")))

        train_metrics = dpo.train_round(c.policy, c.optimizer, batches, ref, cfg.dpo, acc, progress=progress, kto=cfg.kto,
                                        schedule_rounds=(r, cfg.rounds))
        bar.close()
    drift = None
    if ref is not None and not unpaired:  # where each kind of response ended up: likelihood displacement shows here
        with timed("drift", timings):
            chosen, rejected = dpo.logp_drift(ref, dpo.reference_logps(c.policy, batches, acc))
        drift = {"chosen": chosen, "rejected": rejected}
        log.info("round %d update moved the log-likelihood of the chosen responses by %+.2f nats, of the rejected "
                 "by %+.2f (mean per response)", r, chosen, rejected)
    if c.is_main:
        write_jsonl(rdir / "train_metrics.jsonl", train_metrics)
        if drift is not None:
            write_json(rdir / "logp_drift.json", drift)
    with timed("sync", timings):
        weights = policy_weights(c)
        if c.is_main and cfg.generation.backend == "vllm":
            c.generator.update_weights(weights)
    return train_metrics, drift


def reference_rows(records: list[dict], order: list[int], ref: list, unpaired: bool) -> list[dict]:
    """One row per trained pair (example) in batch order: which record, and its reference log-prob(s)."""
    flat = [tuple(float(x) for x in values) for batch in ref for values in zip(*batch)]
    rows = []
    for i, values in zip(order, flat, strict=True):
        rec = records[i]
        if unpaired:
            rows.append({"prompt_id": rec["prompt_id"], "index": rec["index"], "label": rec["label"],
                         "replay_from_round": rec.get("replay_from_round"), "ref_logp": values[0]})
        else:
            rows.append({"prompt_id": rec["prompt_id"], "chosen_index": rec["chosen_index"],
                         "rejected_index": rec["rejected_index"], "replay_from_round": rec.get("replay_from_round"),
                         "ref_chosen": values[0], "ref_rejected": values[1]})
    return rows


def check_kto_balance(c: Campaign, r: int, examples: list[dict]) -> None:
    """Warn when λ_D·n_D / (λ_U·n_U) is outside the KTO paper's advised [1, 4/3], with the weight that fixes it."""
    good = sum(bool(e["label"]) for e in examples)
    bad = len(examples) - good
    k = c.cfg.kto
    ratio = labels.weight_balance(good, bad, k.desirable_weight, k.undesirable_weight)
    if ratio is not None and good and not 1.0 <= ratio <= 4 / 3:
        log.warning("round %d: %d desirable vs %d undesirable examples; λ_D·n_D / (λ_U·n_U) = %.2f is outside the "
                    "KTO paper's advised [1, 4/3]; kto.desirable_weight=%.2f would make it 1",
                    r, good, bad, ratio, k.undesirable_weight * bad / good)


def generation_reference(c: Campaign, r: int, records: list[dict], prompt_ids: dict, order: list[int]) -> list | None:
    """The round's reference log-probs from its candidates' own token log-probs, in the layout
    of `reference_pass` (c.reference_source == "generation"), or None where some record has
    none from this round's generation (replayed from an earlier round, generated without them,
    or not finite): those need the forward pass."""
    if c.reference_source != "generation":
        return None
    responses = ("completion",) if dpo.is_unpaired(c.cfg.dpo.loss) else ("chosen", "rejected")

    def logprobs(rec: dict) -> tuple:
        return tuple(rec.get(f"{name}_token_logprobs") for name in responses)

    def usable(rec: dict) -> bool:
        return rec.get("replay_from_round") is None and all(
            lps is not None and len(lps) == len(rec[f"{name}_token_ids"]) and all(map(math.isfinite, lps))
            for name, lps in zip(responses, logprobs(rec)))

    missing = sum(not usable(records[i]) for i in order)
    if missing:
        log.info("round %d reference: %d of %d records have no log-probs from this round's generation "
                 "(replayed, or generated without them); a forward pass scores the round", r, missing, len(order))
        return None
    rooms = [dpo.response_room(prompt_ids[records[i]["prompt_id"]], c.cfg.dpo.max_length) for i in order]
    return dpo.reference_from_generation([logprobs(records[i]) for i in order], rooms, c.cfg.dpo.batch_size)


def reference_pass(c: Campaign, batches) -> list:
    """Reference log-probs of every batch. refreshed: the policy as it stands (the round-start
    policy); initial: the round-0 model (the frozen copy, or the policy with LoRA switched off)."""
    if c.cfg.dpo.reference == "initial" and c.cfg.lora.enabled:
        with lora.adapter_disabled(c.policy):
            return dpo.reference_logps(c.policy, batches, c.accelerator)
    model = c.reference_model if c.reference_model is not None else c.policy
    return dpo.reference_logps(model, batches, c.accelerator)


def stage_eval(c: Campaign, r: int, base: dict, prev_texts: list[str] | None) -> dict:
    """Held-out responses of the updated policy, judged against the round-0 and previous
    policies, and its diversity (with a warning where it fell well below the initial policy's)."""
    log.info("round %d eval: %d held-out prompts", r, len(c.split.eval))
    texts, lengths = generate_eval(c, derived_seed(c.cfg.seed, r, "eval"), save_to=c.run.round_dir(r) / "eval_responses.jsonl")
    result = evaluate.evaluate_round(as_pairwise(c.judge), c.split.eval, texts, lengths, base["texts"],
                                     prev_texts if c.cfg.eval.compare_previous else None)
    if base.get("diversity"):
        result["diversity"] = measure_diversity(c, derived_seed(c.cfg.seed, r, "diversity"),
                                                c.run.round_dir(r) / "diversity_samples.jsonl")
        result["diversity_warnings"] = diversity.collapse_warnings(
            result["diversity"], base["diversity"], c.cfg.eval.diversity_warn_fraction, "the initial policy")
        for warning in result["diversity_warnings"]:
            log.warning("round %d: %s", r, warning)
    return result


def save_checkpoint(c: Campaign, r: int) -> None:
    """The round's policy -> checkpoint/: a plain HF folder (LoRA merged) + tokenizer, the LoRA
    adapter and, with dpo.optimizer_state=carry, the optimizer state; written to a temp
    folder and renamed, by the main process."""
    weights = policy_weights(c)  # every process: a collective under FSDP/ZeRO-3
    full = dict(weights) if weights is not None else None
    if c.is_main:
        log.info("round %d checkpoint: saving", r)
        unwrapped = c.accelerator.unwrap_model(c.policy)
        with atomic_path(c.run.round_dir(r) / "checkpoint", is_dir=True) as tmp:
            base = unwrapped.get_base_model() if lora.is_peft_model(unwrapped) else unwrapped
            base.save_pretrained(tmp, state_dict=full, safe_serialization=True)
            if c.cfg.lora.enabled:
                lora.save_adapter(unwrapped, tmp / lora.ADAPTER_DIR)
            if c.cfg.dpo.optimizer_state == "carry":
                training.save_optimizer_state(c.optimizer, tmp, c.accelerator)
            c.tokenizer.save_pretrained(tmp)
        c.run.mark_done(r, "checkpoint")
    c.barrier()


def roll_back(c: Campaign, to_round: int | None) -> None:
    """After a rejected round: the policy, a carried optimizer state and the generator go back
    to `to_round`'s checkpoint (None: the initial model), which is also what a resume loads
    (`last_checkpoint` skips rejected rounds). Every process calls it."""
    checkpoint = c.run.round_dir(to_round) / "checkpoint" if to_round is not None else None
    log.info("rolling the policy back to %s", checkpoint or "the initial model")
    restored = build_policy(c.cfg, c.model_path, checkpoint)
    c.accelerator.unwrap_model(c.policy).load_state_dict(restored.state_dict())
    if c.cfg.dpo.optimizer_state == "carry":
        if checkpoint is None or not training.load_optimizer_state(c.optimizer, checkpoint, c.accelerator):
            training.reset_optimizer_state(c.optimizer)
    weights = policy_weights(c)  # a collective under DDP too: every process calls it
    if c.is_main:
        c.generator.update_weights(weights)
    c.barrier()


def keep_checkpoints(c: Campaign, results: list[dict]) -> int | None:
    """Point runs/<name>/best at the best round's checkpoint and, with save_checkpoints=last,
    delete every round's checkpoint but the newest accepted one (the campaign continues from
    it) and the best one; a rejected round's is deleted either way. Returns the best round
    (None: the initial policy). Main process only."""
    best = report.best_round(results)
    newest = last_accepted_round(c.run, c.cfg.rounds)
    for result in results:
        r = result["round"]
        rejected = not result.get("guard", {}).get("accepted", True)
        if rejected or (c.cfg.save_checkpoints == "last" and r not in (best, newest)):
            shutil.rmtree(c.run.round_dir(r) / "checkpoint", ignore_errors=True)
    link = c.run.root / "best"
    if best is None:
        link.unlink(missing_ok=True)
    else:
        tmp = c.run.root / ".best.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(Path(c.run.round_dir(best).name) / "checkpoint")
        tmp.replace(link)  # one rename: the link is never missing or half-made
    return best


def run_campaign(cfg: CampaignConfig, run: RunDir) -> list[dict]:
    """Run (or continue) every round of the campaign; returns one result per round (main process).

    With the round guard (guard.on_loss), a rejected round is rolled back: the next round
    starts from the last accepted policy (retry), or the campaign stops there (stop)."""
    c = setup(cfg, run)
    base = baseline(c) if c.is_main else {"texts": [], "accuracy": None}
    c.barrier()
    results = []
    prev_texts = None  # held-out responses of the policy the next round starts from (None: the initial one)
    best = stopped = None
    for r in range(cfg.rounds):
        rdir = run.round_dir(r)
        ran = not run.is_done(r, "eval")
        if ran:
            log.info("round %d / %d", r, cfg.rounds - 1)
            result = run_round(c, r, base, prev_texts)
        else:
            result = json.loads((rdir / "eval.json").read_text()) if c.is_main else None
        if not accepted(run, r):  # every process has read the manifest back (run_round's barrier)
            if ran:
                roll_back(c, last_accepted_round(run, cfg.rounds))
            log.warning("round %d rejected by the round guard: %s", r, (result or {}).get("guard", {}).get("reason"))
        elif cfg.eval.enabled and c.is_main:
            prev_texts = [row["text"] for row in read_jsonl(rdir / "eval_responses.jsonl")]
        if c.is_main:
            results.append(result)
            best = keep_checkpoints(c, results)
            if ran and cfg.eval.enabled:
                report.print_rounds(results, base["accuracy"], baseline_diversity=base.get("diversity"))
        if not accepted(run, r) and guard_mode(cfg) == "stop":
            stopped = r
            log.warning("the campaign stops after round %d (guard.on_loss=stop)", r)
            break
    if c.is_main:
        log.info("best policy: %s", f"round {best}'s ({run.root / 'best'})" if best is not None else "the initial one")
        write_json(run.root / "summary.json", {"baseline_accuracy": base["accuracy"],
                                               "baseline_diversity": base.get("diversity"), "rounds": results,
                                               "best_round": best, "stopped_after_round": stopped})
    return results
