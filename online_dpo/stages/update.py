"""The update stage: the round's records -> batches -> reference log-probs -> DPO update ->
likelihood drift -> the new weights pushed into the generator."""

from __future__ import annotations

import json
import logging
import math

from tqdm.auto import tqdm

from online_dpo.campaign import Campaign, once, policy_version, policy_weights, timed
from online_dpo.config.loss_type import LossType
from online_dpo.data import chat_prompt_ids
from online_dpo.objectives import Objective
from online_dpo.rundir import RoundPaths, read_jsonl, write_json, write_jsonl
from online_dpo.seeds import stable_seed
from online_dpo.stages.select import training_set
from online_dpo.train import lora, optim
from online_dpo.train.logps import reference_from_generation, reference_logps
from online_dpo.train.losses import logp_drift
from online_dpo.train.packing import response_room
from online_dpo.train.update import train_round

log = logging.getLogger("online_dpo")


def stage_update(c: Campaign, r: int, timings: dict) -> tuple[list[dict], dict | None]:
    """Reference log-probs, DPO update, likelihood drift and weight sync (all processes); read
    back once the round's checkpoint is saved. Returns the per-step training metrics and the
    drift of the trained pairs' log-likelihoods (None where the objective has none to measure)."""
    return once(c.run, r, "checkpoint", lambda: update_policy(c, r, timings),
                lambda: read_update(c.run.round_paths(r)))


def read_update(paths: RoundPaths) -> tuple[list[dict], dict | None]:
    metrics = read_jsonl(paths.train_metrics) if paths.train_metrics.exists() else []
    return metrics, json.loads(paths.logp_drift.read_text()) if paths.logp_drift.exists() else None


def update_policy(c: Campaign, r: int, timings: dict) -> tuple[list[dict], dict | None]:
    records = training_set(c, r)  # every process reads the same records back from disk
    if not records:
        log.warning("round %d produced no pairs; the policy is unchanged", r)
        return [], None
    cfg, acc, objective, paths = c.cfg, c.accelerator, c.objective, c.run.round_paths(r)
    prompt_ids = {p["prompt_id"]: chat_prompt_ids(c.tokenizer, p["prompt"]) for p in records}
    batches, order = objective.batches(records, prompt_ids, c.tokenizer.pad_token_id,
                                       stable_seed(cfg.seed, r, "batches"), acc.num_processes)
    if c.is_main:
        objective.check(r, records)
    ref = None  # reference-free losses (simpo, orpo): no reference pass, no reference_logps.jsonl
    if LossType(cfg.dpo.loss).needs_reference:
        with timed("reference", timings):
            ref = generation_reference(c, r, records, prompt_ids, order) or reference_pass(c, batches)
    if c.is_main and ref is not None:  # which reference scored which pair, for people and for tests of dpo.reference
        write_jsonl(paths.reference_logps, reference_rows(objective, records, order, ref))
    with timed("update", timings):
        if cfg.dpo.optimizer_state == "fresh":
            optim.reset_optimizer_state(c.optimizer)  # new moments each round: the pairs are new data
        bar = tqdm(desc=f"round {r} update ({cfg.dpo.loss})", unit="step", leave=False, disable=not c.is_main)

        def progress(m: dict) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.3f}")
            if c.is_main:
                log.info("round %d update: step %d loss %.4f margin %.4f kl %.4f", r, m["step"] + 1, m["loss"],
                         m["reward_margin"], m.get("kl", float("nan")))

        train_metrics = train_round(c.policy, c.optimizer, batches, ref, cfg.dpo, acc, progress=progress, kto=cfg.kto,
                                    schedule_rounds=(r, cfg.rounds))
        bar.close()
    drift = None
    if ref is not None and objective.measures_drift:  # where each kind of response ended up: likelihood displacement shows here
        with timed("drift", timings):
            chosen, rejected = logp_drift(ref, reference_logps(c.policy, batches, acc))
        drift = {"chosen": chosen, "rejected": rejected}
        log.info("round %d update moved the log-likelihood of the chosen responses by %+.2f nats, of the rejected "
                 "by %+.2f (mean per response)", r, chosen, rejected)
    if c.is_main:
        write_jsonl(paths.train_metrics, train_metrics)
        if drift is not None:
            write_json(paths.logp_drift, drift)
    with timed("sync", timings):
        weights = policy_weights(c)
        if c.generator is not None:  # the main process's, and with an in-process backend every process's own
            c.generator.update_weights(weights, policy_version(r))
    return train_metrics, drift


def reference_rows(objective: Objective, records: list[dict], order: list[int], ref: list) -> list[dict]:
    """One row per trained record in batch order: which record, and its reference log-prob(s)."""
    flat = [tuple(float(x) for x in values) for batch in ref for values in zip(*batch)]
    return [objective.reference_row(records[i], values) for i, values in zip(order, flat, strict=True)]


def generation_reference(c: Campaign, r: int, records: list[dict], prompt_ids: dict, order: list[int]) -> list | None:
    """The round's reference log-probs from its candidates' own token log-probs, in the layout
    of `reference_pass` (c.reference_source == "generation"), or None where some record has
    none from this round's generation (replayed from an earlier round, generated without them,
    or not finite): those need the forward pass."""
    if c.reference_source != "generation":
        return None
    responses = c.objective.responses

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
    rooms = [response_room(prompt_ids[records[i]["prompt_id"]], c.cfg.dpo.max_length) for i in order]
    return reference_from_generation([logprobs(records[i]) for i in order], rooms, c.cfg.dpo.batch_size)


def reference_pass(c: Campaign, batches) -> list:
    """Reference log-probs of every batch. refreshed: the policy as it stands (the round-start
    policy); initial: the round-0 model (the frozen copy, or the policy with LoRA switched off)."""
    if c.cfg.dpo.reference == "initial" and c.cfg.lora.enabled:
        with lora.adapter_disabled(c.policy):
            return reference_logps(c.policy, batches, c.accelerator)
    model = c.reference_model if c.reference_model is not None else c.policy
    return reference_logps(model, batches, c.accelerator)
