"""The campaign loop: online, iterative DPO with AI feedback, as a sequence of stage calls.

    for r in rounds:
        prompts    = fresh train prompts (the held-out eval prompts are never trained on)
        candidates = K samples per prompt from the current policy, scored by the judge
        records    = objective.select(candidates, scores)   # best-vs-worst pairs, or KTO examples
        policy     = DPO update on the records, against the round's reference log-probs
        generator  <- policy (weights pushed in place)
        eval       = held-out win rate vs the initial and the previous policy, accuracy, diversity
        guard      = a round that loses to the policy it started from is rolled back

Simplifications: one judge for training and eval; the reference is refreshed each round
(dpo.reference); every stage's outputs go to runs/<name>/round_XXX/ and its marker to the
manifest, so a crashed campaign resumes at the first unfinished stage.
"""

from __future__ import annotations

import json
import logging

from online_dpo.campaign import Campaign, accepted, guard_mode, last_accepted_round, setup
from online_dpo.config import CampaignConfig
from online_dpo.report.terminal import print_rounds
from online_dpo.rundir import RunDir, read_jsonl, write_json, write_jsonl
from online_dpo.stages.checkpoint import keep_checkpoints, roll_back, stage_checkpoint
from online_dpo.stages.evaluate import baseline, judge_stats, record_round, stage_eval
from online_dpo.stages.generate import generate_and_judge
from online_dpo.stages.select import stage_pairs
from online_dpo.stages.update import stage_update

log = logging.getLogger("online_dpo")


def run_round(c: Campaign, r: int, base: dict, prev_texts: list[str] | None) -> dict | None:
    """One round, stage by stage; a finished stage is read back, not redone.
    Returns the round's record on the main process, None on the others."""
    timings: dict[str, float] = {}
    if c.is_main:  # generation, judging and selection run on the main process only
        judge_before = judge_stats(c)
        prompts = c.split.round_prompts(r, c.cfg.data.train_prompts_per_round)
        write_jsonl(c.run.round_paths(r).prompts, [p.to_record() for p in prompts])
        candidates, scores = generate_and_judge(c, r, prompts, timings)
        funnel = stage_pairs(c, r, prompts, candidates, scores)
    c.barrier()
    train_metrics, drift = stage_update(c, r, timings)  # every process
    stage_checkpoint(c, r, timings)
    if not c.is_main:
        c.barrier()  # while the main process evaluates
        return None
    held_out = stage_eval(c, r, base, prev_texts, timings)
    result = record_round(c, r, funnel, held_out, train_metrics, drift, judge_before, timings,
                          against_previous=prev_texts is not None)
    c.barrier()
    return result


def run_campaign(cfg: CampaignConfig, run: RunDir, judge: object | None = None) -> list[dict]:
    """Run (or continue) every round of the campaign; returns one result per round (main process).
    `judge`: a judge object or scoring function in place of the one cfg.judge names.

    With the round guard (guard.on_loss), a rejected round is rolled back: the next round
    starts from the last accepted policy (retry), or the campaign stops there (stop)."""
    c = setup(cfg, run, judge)
    base = baseline(c) if c.is_main else {"texts": [], "accuracy": None}
    c.barrier()
    results = []
    prev_texts = None  # held-out responses of the policy the next round starts from (None: the initial one)
    best = stopped = None
    for r in range(cfg.rounds):
        paths = run.round_paths(r)
        ran = not run.is_done(r, "eval")
        if ran:
            log.info("round %d / %d", r, cfg.rounds - 1)
            result = run_round(c, r, base, prev_texts)
        else:
            result = json.loads(paths.eval_json.read_text()) if c.is_main else None
        if not accepted(run, r):  # every process has read the manifest back (run_round's barrier)
            if ran:
                roll_back(c, last_accepted_round(run, cfg.rounds))
            log.warning("round %d rejected by the round guard: %s", r, (result or {}).get("guard", {}).get("reason"))
        elif cfg.eval.enabled and c.is_main:
            prev_texts = [row["text"] for row in read_jsonl(paths.eval_responses)]
        if c.is_main:
            results.append(result)
            best = keep_checkpoints(c, results)
            if ran and cfg.eval.enabled:
                print_rounds(results, base["accuracy"], baseline_diversity=base.get("diversity"))
        if not accepted(run, r) and guard_mode(cfg) == "stop":
            stopped = r
            log.warning("the campaign stops after round %d (guard.on_loss=stop)", r)
            break
    if c.is_main:
        log.info("best policy: %s", f"round {best}'s ({run.best_link})" if best is not None else "the initial one")
        write_json(run.summary_json, {"baseline_accuracy": base["accuracy"], "baseline_diversity": base.get("diversity"),
                                      "rounds": results, "best_round": best, "stopped_after_round": stopped})
    return results
