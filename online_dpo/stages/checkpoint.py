"""The checkpoint stage and what the round guard does with checkpoints: save a round's
policy, roll a rejected round back, keep the newest accepted and the best, link `best`."""

from __future__ import annotations

import logging

from online_dpo.campaign import Campaign, build_policy, last_accepted_round, once, policy_version, policy_weights, timed
from online_dpo.report.view import best_round
from online_dpo.rundir import atomic_path
from online_dpo.train import lora, optim

log = logging.getLogger("online_dpo")


def stage_checkpoint(c: Campaign, r: int, timings: dict) -> None:
    """Save round r's policy unless a resumed run saved it already (every process calls it)."""
    def save() -> None:
        with timed("checkpoint", timings):
            save_checkpoint(c, r)

    once(c.run, r, "checkpoint", save, lambda: None)


def save_checkpoint(c: Campaign, r: int) -> None:
    """The round's policy -> checkpoint/: a plain HF folder (LoRA merged) + tokenizer, the LoRA
    adapter and, with dpo.optimizer_state=carry, the optimizer state; written to a temp
    folder and renamed, by the main process."""
    weights = policy_weights(c)  # every process: a collective under FSDP/ZeRO-3
    if c.is_main:
        log.info("round %d checkpoint: saving", r)
        unwrapped = c.accelerator.unwrap_model(c.policy)
        with atomic_path(c.run.round_paths(r).checkpoint, is_dir=True) as tmp:
            lora.save_merged(unwrapped, tmp, weights)
            if c.cfg.lora.enabled:
                lora.save_adapter(unwrapped, tmp / lora.ADAPTER_DIR)
            if c.cfg.dpo.optimizer_state == "carry":
                optim.save_optimizer_state(c.optimizer, tmp, c.accelerator)
            c.tokenizer.save_pretrained(tmp)
        c.run.mark_done(r, "checkpoint")
    c.barrier()


def roll_back(c: Campaign, to_round: int | None) -> None:
    """After a rejected round: the policy, a carried optimizer state and the generator go back
    to `to_round`'s checkpoint (None: the initial model), which is also what a resume loads
    (`last_checkpoint` skips rejected rounds). Every process calls it."""
    checkpoint = c.run.round_paths(to_round).checkpoint if to_round is not None else None
    log.info("rolling the policy back to %s", checkpoint or "the initial model")
    restored = build_policy(c.cfg, c.model_path, checkpoint)
    c.accelerator.unwrap_model(c.policy).load_state_dict(restored.state_dict())
    if c.cfg.dpo.optimizer_state == "carry":
        if checkpoint is None or not optim.load_optimizer_state(c.optimizer, checkpoint, c.accelerator):
            optim.reset_optimizer_state(c.optimizer)
    weights = policy_weights(c)  # a collective under DDP too: every process calls it
    if c.generator is not None:
        c.generator.update_weights(weights, policy_version(to_round))
    c.barrier()


def keep_checkpoints(c: Campaign, results: list[dict]) -> int | None:
    """Point runs/<name>/best at the best round's checkpoint and, with save_checkpoints=last,
    delete every round's checkpoint but the newest accepted one (the campaign continues from
    it) and the best one; a rejected round's is deleted either way. Returns the best round
    (None: the initial policy). Main process only."""
    best = best_round(results)
    newest = last_accepted_round(c.run, c.cfg.rounds)
    for result in results:
        r = result["round"]
        rejected = not result.get("guard", {}).get("accepted", True)
        if rejected or (c.cfg.save_checkpoints == "last" and r not in (best, newest)):
            c.run.remove(c.run.round_paths(r).checkpoint)
    link = c.run.best_link
    if best is None:
        link.unlink(missing_ok=True)
    else:
        tmp = c.run.root / ".best.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(c.run.round_paths(best).checkpoint.relative_to(c.run.root))
        tmp.replace(link)  # one rename: the link is never missing or half-made
    return best
