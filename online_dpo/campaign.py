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
import hashlib
import json
import logging
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from judges import as_pairwise, load_judge
from judges.ranking import CandidateGroup, score_groups
from online_dpo import dpo, evaluate, report
from online_dpo.config import CampaignConfig
from online_dpo.data import check_prompt_lengths, chat_prompt_ids, load_prompts
from online_dpo.generate import Completion, HFGenerator, Sampling, VLLMGenerator
from online_dpo.models import load_policy, load_tokenizer, resolve_model_path
from online_dpo.pairs import Candidate, select_pairs
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


def mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "no"


def vllm_dtype(choice: str) -> str:
    if choice != "auto":
        return choice
    return "bfloat16" if torch.cuda.is_available() else "float32"


@dataclass
class Campaign:
    """What the loop holds between rounds (built once by `setup`)."""

    cfg: CampaignConfig
    run: RunDir
    accelerator: object
    tokenizer: object
    split: object
    judge: object
    policy: torch.nn.Module
    optimizer: torch.optim.Optimizer
    generator: object


def setup(cfg: CampaignConfig, run: RunDir) -> Campaign:
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=mixed_precision(cfg.dpo.mixed_precision), cpu=not torch.cuda.is_available())
    model_path = resolve_model_path(cfg.policy.model)
    tokenizer = load_tokenizer(model_path)
    split = load_prompts(cfg.data)
    check_prompt_lengths(split.train[: cfg.rounds * cfg.data.train_prompts_per_round] + split.eval,
                         tokenizer, cfg.policy.max_prompt_tokens)
    split.round_prompts(cfg.rounds - 1, cfg.data.train_prompts_per_round)  # fail now, not in round N
    judge = load_judge(cfg.judge.name, **cfg.judge.options)

    last = last_checkpoint(run, cfg.rounds)
    policy = load_policy(str(last) if last else model_path)
    if last:
        log.info("resuming from %s", last)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.dpo.learning_rate, weight_decay=cfg.dpo.weight_decay)
    policy, optimizer = accelerator.prepare(policy, optimizer)

    if cfg.generation.backend == "vllm":
        gen_cfg = cfg.generation
        gen_cfg.dtype = vllm_dtype(gen_cfg.dtype)  # resolved in place: the bench and logs read it back
        max_len = cfg.policy.max_prompt_tokens + max(gen_cfg.max_new_tokens, cfg.eval.max_new_tokens)
        generator = VLLMGenerator(model_path, tokenizer, gen_cfg, max_model_len=max_len, seed=cfg.seed)
        if last:
            generator.update_weights(accelerator.unwrap_model(policy))
    else:
        generator = HFGenerator(accelerator.unwrap_model(policy), tokenizer)
    return Campaign(cfg, run, accelerator, tokenizer, split, judge, policy, optimizer, generator)


def last_checkpoint(run: RunDir, rounds: int):
    for r in reversed(range(rounds)):
        if run.is_done(r, "checkpoint"):
            path = run.round_dir(r) / "checkpoint"
            return path if (path / "config.json").exists() else None
    return None


# --- stages ---------------------------------------------------------------------------

def completion_rows(prompts, completions: list[list[Completion]]) -> list[dict]:
    return [{"prompt_id": p.id, "index": i, "text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason}
            for p, cs in zip(prompts, completions) for i, c in enumerate(cs)]


def rows_to_candidates(prompts, rows: list[dict]) -> list[list[Candidate]]:
    by_prompt: dict[str, list[Candidate]] = {p.id: [] for p in prompts}
    for row in rows:
        by_prompt[row["prompt_id"]].append(Candidate(row["prompt_id"], row["index"], row["text"],
                                                     list(row["token_ids"]), row["finish_reason"]))
    return [sorted(by_prompt[p.id], key=lambda c: c.index) for p in prompts]


def generate_eval(c: Campaign, seed: int, save_to=None) -> tuple[list[str], list[int]]:
    """One response per held-out prompt: (texts, token counts), also saved as JSONL to `save_to` if given."""
    sampling = Sampling(1, c.cfg.eval.temperature, 1.0, c.cfg.eval.max_new_tokens, seed)
    outs = c.generator.generate(c.split.eval, sampling)
    texts, lengths = [o[0].text for o in outs], [len(o[0].token_ids) for o in outs]
    if save_to is not None:
        write_jsonl(save_to, [{"prompt_id": p.id, "text": t, "tokens": n} for p, t, n in zip(c.split.eval, texts, lengths)])
    return texts, lengths


def baseline(c: Campaign) -> dict:
    """The round-0 policy's eval responses: generated once, reused by every round."""
    path = c.run.root / "baseline" / "eval_responses.jsonl"
    if c.run.is_done("baseline", "eval"):
        texts = [row["text"] for row in read_jsonl(path)]
        return {"texts": texts, "accuracy": c.run.manifest["rounds"]["baseline"]["eval"]["accuracy"]}
    texts, _ = generate_eval(c, derived_seed(c.cfg.seed, "baseline-eval"), save_to=path)
    acc = evaluate.accuracy(c.split.eval, texts)
    c.run.mark_done("baseline", "eval", accuracy=acc)
    return {"texts": texts, "accuracy": acc}


def run_round(c: Campaign, r: int, base_texts: list[str], prev_texts: list[str] | None) -> dict:
    cfg, run = c.cfg, c.run
    rdir = run.round_dir(r)
    timings: dict[str, float] = {}
    stats_before = copy.deepcopy(getattr(c.judge, "stats", None))
    prompts = c.split.round_prompts(r, cfg.data.train_prompts_per_round)
    write_jsonl(rdir / "prompts.jsonl", [p.to_record() for p in prompts])

    with timed("generate", timings):
        if run.is_done(r, "generate"):
            rows = read_parquet(rdir / "candidates.parquet")
        else:
            g = cfg.generation
            sampling = Sampling(g.samples_per_prompt, g.temperature, g.top_p, g.max_new_tokens,
                                derived_seed(cfg.seed, r, "train-generate"))
            rows = completion_rows(prompts, c.generator.generate(prompts, sampling))
            write_parquet(rdir / "candidates.parquet", rows)
            run.mark_done(r, "generate", candidates=len(rows))
        candidates = rows_to_candidates(prompts, rows)

    with timed("judge", timings):
        if run.is_done(r, "judge"):
            judged = read_parquet(rdir / "judgments.parquet")
        else:
            groups = [CandidateGroup(p.text, [x.text for x in cs], p.reference) for p, cs in zip(prompts, candidates)]
            scores = []
            # Chunks, so a slow judge (an API, a local LLM) shows progress as it goes.
            for i in tqdm(range(0, len(groups), JUDGE_CHUNK), desc=f"round {r} judging", unit="chunk", leave=False):
                scores += score_groups(c.judge, groups[i : i + JUDGE_CHUNK])[0]
            judged = [{"prompt_id": p.id, "index": x.index, "score": s.value, "error": s.error, "raw": s.raw}
                      for p, cs, ss in zip(prompts, candidates, scores) for x, s in zip(cs, ss)]
            write_parquet(rdir / "judgments.parquet", judged)
            run.mark_done(r, "judge", errors=sum(j["error"] is not None for j in judged))
        score_of = {(j["prompt_id"], j["index"]): j["score"] for j in judged}
        scores = [[score_of[(x.prompt_id, x.index)] for x in cs] for cs in candidates]

    pairs, funnel = select_pairs(prompts, candidates, scores, cfg.pairs)
    if not run.is_done(r, "pairs"):
        from datasets import Dataset

        with atomic_path(rdir / "pairs", is_dir=True) as tmp:
            Dataset.from_list(pairs).save_to_disk(str(tmp))
        write_json(rdir / "funnel.json", funnel.as_dict())
        run.mark_done(r, "pairs", pairs=len(pairs))
    log.info("round %d funnel: %s", r, funnel.as_dict())

    train_metrics: list[dict] = []
    trained = run.is_done(r, "checkpoint")  # resumed after this round's update was saved
    if trained:
        train_metrics = read_jsonl(rdir / "train_metrics.jsonl") if (rdir / "train_metrics.jsonl").exists() else []
    elif pairs:
        prompt_ids = {p.id: chat_prompt_ids(c.tokenizer, p.messages) for p in prompts}
        batches = dpo.make_batches(pairs, prompt_ids, cfg.dpo, c.tokenizer.pad_token_id, derived_seed(cfg.seed, r, "batches"))
        with timed("reference", timings):
            ref = dpo.reference_logps(c.policy, batches, c.accelerator)
        with timed("update", timings):
            c.optimizer.state.clear()  # a fresh optimizer state each round: the pairs are new data
            bar = tqdm(desc=f"round {r} DPO", unit="step", leave=False)
            train_metrics = dpo.train_round(c.policy, c.optimizer, batches, ref, cfg.dpo, c.accelerator,
                                            progress=lambda m: (bar.update(1), bar.set_postfix(loss=f"{m['loss']:.3f}")))
            bar.close()
        write_jsonl(rdir / "train_metrics.jsonl", train_metrics)
        with timed("sync", timings):
            c.generator.update_weights(c.accelerator.unwrap_model(c.policy))
    else:
        log.warning("round %d produced no pairs (funnel: %s); the policy is unchanged", r, funnel.as_dict())

    if not trained:
        with timed("checkpoint", timings):
            save_checkpoint(c, r)

    result = {"round": r, "pairs": len(pairs), "funnel": funnel.as_dict()}
    if cfg.eval.enabled:
        with timed("eval", timings):
            texts, lengths = generate_eval(c, derived_seed(cfg.seed, r, "eval"), save_to=rdir / "eval_responses.jsonl")
            pairwise = as_pairwise(c.judge)
            result["eval"] = evaluate.evaluate_round(pairwise, c.split.eval, texts, lengths, base_texts,
                                                     prev_texts if cfg.eval.compare_previous else None)
    if train_metrics:
        last = train_metrics[-1]
        result["train"] = {"steps": len(train_metrics), "final_loss": last["loss"],
                           "final_reward_margin": last["reward_margin"],
                           "train_tokens_per_s": last["train_tokens_per_s"]}
    if stats_before is not None:  # API judges: this round's requests, cache hits, cost, position consistency
        result["judge_stats"] = c.judge.stats.since(stats_before).as_dict()
    if hasattr(c.judge, "protocol"):  # LLM judges: which templates (by hash) produced this round's verdicts
        result["judge_templates"] = c.judge.protocol.templates()
    result["timings"] = timings
    result["wall_s"] = sum(timings.values())
    write_json(rdir / "eval.json", result)
    run.mark_done(r, "eval", wall_s=result["wall_s"])
    return result


def save_checkpoint(c: Campaign, r: int) -> None:
    rdir = c.run.round_dir(r)
    with atomic_path(rdir / "checkpoint", is_dir=True) as tmp:
        c.accelerator.unwrap_model(c.policy).save_pretrained(tmp, safe_serialization=True)
        c.tokenizer.save_pretrained(tmp)
    c.run.mark_done(r, "checkpoint")
    if c.cfg.save_checkpoints == "last" and r > 0:
        shutil.rmtree(c.run.round_dir(r - 1) / "checkpoint", ignore_errors=True)


def run_campaign(cfg: CampaignConfig, run: RunDir) -> list[dict]:
    """Run (or continue) every round of the campaign; returns one result per round."""
    c = setup(cfg, run)
    base = baseline(c)
    base_texts = base["texts"]
    results = []
    prev_texts = None
    for r in range(cfg.rounds):
        rdir = run.round_dir(r)
        if run.is_done(r, "eval"):
            results.append(json.loads((rdir / "eval.json").read_text()))
            if (rdir / "eval_responses.jsonl").exists():
                prev_texts = [row["text"] for row in read_jsonl(rdir / "eval_responses.jsonl")]
            continue
        log.info("round %d / %d", r, cfg.rounds - 1)
        result = run_round(c, r, base_texts, prev_texts if r > 0 else None)
        results.append(result)
        if cfg.eval.enabled:
            prev_texts = [row["text"] for row in read_jsonl(rdir / "eval_responses.jsonl")]
            report.print_rounds(results, base["accuracy"])
    write_json(run.root / "summary.json", {"baseline_accuracy": base["accuracy"], "rounds": results})
    return results
