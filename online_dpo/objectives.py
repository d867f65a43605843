"""What a round trains on, per kind of loss: the `Objective` protocol, with pairwise DPO
(chosen vs rejected pairs) and KTO (labelled single responses) as its two implementations.
The loop and the stages ask the objective; they never branch on the loss themselves.
"""

from __future__ import annotations

import logging
from typing import Protocol

from online_dpo import labels
from online_dpo.config import CampaignConfig, DPOConfig, KTOConfig, PairsConfig
from online_dpo.config.loss_type import LossType
from online_dpo.pairs import Candidate, Funnel, select_pairs
from online_dpo.train.packing import ExampleBatch, PairBatch, make_batches, make_example_batches

log = logging.getLogger("online_dpo")


class Objective(Protocol):
    """How a round turns judged candidates into training records, and those into batches."""

    name: str  # the records' name: the round folder they are saved in, and the result's count key
    responses: tuple[str, ...]  # the responses of one record, in the order of its reference log-probs
    replay_keys: tuple[str, ...]  # what replay.jsonl keeps of a replayed record: enough to find it
    measures_drift: bool  # the update reports how far it moved the chosen and rejected likelihoods
    tests_separation: bool  # `select` acts on the judge's separation test (separation.py)

    def select(self, prompts, candidates: list[list[Candidate]], scores: list[list[float | None]],
               seed: int, separation: list[float | None] | None = None,
               separation_level: float = 1.0) -> tuple[list[dict], Funnel | labels.LabelFunnel]:
        """The round's fresh records and the funnel of what was kept and dropped. `separation`:
        each prompt's round-robin p-value (pairwise judges), tested at `separation_level`, for
        the objectives that use it."""

    def batches(self, records: list[dict], prompt_ids: dict[str, list[int]], pad_id: int, seed: int,
                num_processes: int) -> tuple[list[PairBatch] | list[ExampleBatch], list[int]]:
        """Shuffled batches of `records`, and the record index of every batched item in order."""

    def check(self, r: int, records: list[dict]) -> None:
        """Warn about a training set this objective will learn badly from."""

    def reference_row(self, record: dict, values: tuple[float, ...]) -> dict:
        """reference_logps.jsonl's row for one record and its reference log-prob(s)."""


class PairwiseDPO:
    """Preference pairs (chosen, rejected) for the pairwise losses: DPO, IPO, hinge, SimPO, ORPO..."""

    name = "pairs"
    responses = ("chosen", "rejected")
    replay_keys = ("replay_from_round", "prompt_id", "chosen_index", "rejected_index")
    measures_drift = True  # against the reference log-probs, where the loss has them
    tests_separation = True

    def __init__(self, pairs: PairsConfig, dpo: DPOConfig):
        self.pairs_cfg, self.dpo_cfg = pairs, dpo

    def select(self, prompts, candidates, scores, seed, separation=None, separation_level=1.0):
        return select_pairs(prompts, candidates, scores, self.pairs_cfg, seed=seed, separation=separation,
                            separation_level=separation_level)

    def batches(self, records, prompt_ids, pad_id, seed, num_processes):
        return make_batches(records, prompt_ids, **batching(self.dpo_cfg), pad_id=pad_id, seed=seed,
                            num_processes=num_processes)

    def check(self, r, records):
        pass

    def reference_row(self, record, values):
        return {"prompt_id": record["prompt_id"], "chosen_index": record["chosen_index"],
                "rejected_index": record["rejected_index"], "replay_from_round": record.get("replay_from_round"),
                "ref_chosen": values[0], "ref_rejected": values[1]}


class KTO:
    """Desirable / undesirable single responses, labelled from pointwise scores (dpo.loss=kto)."""

    name = "examples"
    responses = ("completion",)
    replay_keys = ("replay_from_round", "prompt_id", "index")
    measures_drift = False  # one kind of response only: the chosen/rejected drift has no meaning
    tests_separation = False  # every response is labelled by its own score: no pair to keep or weigh

    def __init__(self, kto: KTOConfig, dpo: DPOConfig):
        self.kto_cfg, self.dpo_cfg = kto, dpo

    def select(self, prompts, candidates, scores, seed, separation=None, separation_level=1.0):
        return labels.label_candidates(prompts, candidates, scores, self.kto_cfg)  # labels each response: no pairs to test

    def batches(self, records, prompt_ids, pad_id, seed, num_processes):
        return make_example_batches(records, prompt_ids, **batching(self.dpo_cfg), pad_id=pad_id, seed=seed,
                                    num_processes=num_processes)

    def check(self, r, records):
        """Warn when λ_D·n_D / (λ_U·n_U) is outside the KTO paper's advised [1, 4/3], with the weight that fixes it."""
        good = sum(bool(e["label"]) for e in records)
        bad = len(records) - good
        k = self.kto_cfg
        ratio = labels.weight_balance(good, bad, k.desirable_weight, k.undesirable_weight)
        if ratio is not None and good and not 1.0 <= ratio <= 4 / 3:
            log.warning("round %d: %d desirable vs %d undesirable examples; λ_D·n_D / (λ_U·n_U) = %.2f is outside the "
                        "KTO paper's advised [1, 4/3]; kto.desirable_weight=%.2f would make it 1",
                        r, good, bad, ratio, k.undesirable_weight * bad / good)

    def reference_row(self, record, values):
        return {"prompt_id": record["prompt_id"], "index": record["index"], "label": record["label"],
                "replay_from_round": record.get("replay_from_round"), "ref_logp": values[0]}


def batching(dpo: DPOConfig) -> dict:
    """The builder from the dpo section to the packing functions' arguments."""
    return {"batch_size": dpo.batch_size, "max_length": dpo.max_length}


def build_objective(cfg: CampaignConfig) -> Objective:
    """The objective of `cfg.dpo.loss`, with the config sections it reads."""
    if LossType(cfg.dpo.loss).unpaired:
        return KTO(cfg.kto, cfg.dpo)
    return PairwiseDPO(cfg.pairs, cfg.dpo)
