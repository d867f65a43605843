"""Turning judged candidates into unpaired desirable / undesirable examples (for KTO).

A pointwise judge (a verifier, a rubric score, a reward model) gives every candidate a
score; KTO learns from each candidate on its own, so no candidate is wasted on pairing.
Per prompt, each candidate with a usable score (not a judge error) is labelled by
`KTOConfig.label_by`:

- threshold: desirable when its score >= `threshold`, else undesirable. Every judged
  candidate gets a label (an absolute standard: a prompt whose K answers are all wrong
  yields K undesirable examples).
- rank: the top `desirable_fraction` of the prompt's judged candidates (by score) are
  desirable and the rest undesirable, relative to each other. Equal scores always share a
  label: the cut moves to the nearest place between two different scores (so with a 0/1
  verifier and 2 right answers of 8, those 2 are desirable and the 6 others undesirable),
  and a prompt whose candidates all scored the same yields nothing ("all tied").

Everything here is a pure function of its inputs, so a resumed campaign labels the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from online_dpo.config import KTOConfig
from online_dpo.data.prompts import Prompt
from online_dpo.pairs import Candidate, judged_candidates


@dataclass
class LabelFunnel:
    """What happened to a round's candidates, from generation to labelled examples.

    Invariants: candidates == judged + judge_errors; judged == desirable + undesirable + unlabelled.
    """

    prompts: int = 0
    candidates: int = 0
    judged: int = 0  # candidates with a usable score
    judge_errors: int = 0  # score None or not finite: never labelled, never trained on
    desirable: int = 0
    undesirable: int = 0
    unlabelled: int = 0  # rank: candidates of prompts whose scores are all equal
    prompts_used: int = 0  # prompts with at least one labelled example
    replayed: int = 0  # earlier rounds' examples added to this round's update (the campaign sets it)

    @property
    def examples(self) -> int:
        return self.desirable + self.undesirable

    def as_dict(self) -> dict:
        return {"prompts": self.prompts, "candidates": self.candidates, "judged": self.judged,
                "judge_errors": self.judge_errors, "examples": self.examples, "desirable": self.desirable,
                "undesirable": self.undesirable, "unlabelled": self.unlabelled,
                "prompts_used": self.prompts_used, "replayed": self.replayed}

    def summary(self) -> str:
        """One readable line for the log, e.g.

        24 prompts -> 192 candidates -> 190 judged (2 judge errors) -> 120 examples
        (40 desirable, 80 undesirable) from 15 prompts; 70 unlabelled (all tied)
        """
        line = (f"{self.prompts} prompts -> {self.candidates} candidates -> {self.judged} judged "
                f"({self.judge_errors} judge errors) -> {self.examples} examples ({self.desirable} desirable, "
                f"{self.undesirable} undesirable) from {self.prompts_used} prompts")
        if self.replayed:
            line += f" (+{self.replayed} replayed)"
        if self.unlabelled:
            line += f"; {self.unlabelled} unlabelled (all tied)"
        return line


def rank_labels(scores: list[float], desirable_fraction: float) -> list[bool | None]:
    """Labels by rank within one prompt's judged candidates: True (desirable) / False, or
    None for all of them when every score is equal (no rank to learn from). [n] -> [n].

    The target is the top desirable_fraction·n; the cut is placed at the nearest position j
    (1 <= j <= n-1, the j best above it) between two different scores, the smaller j when two
    are equally near, so candidates with equal scores are never split.
    """
    n = len(scores)
    ordered = sorted(scores, reverse=True)
    cuts = [j for j in range(1, n) if ordered[j - 1] > ordered[j]]
    if not cuts:
        return [None] * n  # all tied (or a single candidate)
    target = desirable_fraction * n
    j = min(cuts, key=lambda cut: (abs(cut - target), cut))
    return [s >= ordered[j - 1] for s in scores]


def label_candidates(prompts: list[Prompt], candidates: list[list[Candidate]], scores: list[list[float | None]],
                     cfg: KTOConfig) -> tuple[list[dict], LabelFunnel]:
    """Desirable / undesirable examples for one round, by `cfg.label_by`.

    Args: `candidates[i]` and `scores[i]` are the K candidates of `prompts[i]` and their
    scores (None where the judge failed). Returns example records (prompt order, then
    candidate order) and the funnel.
    """
    funnel = LabelFunnel(prompts=len(prompts))
    examples = []
    for prompt, cands, cand_scores in zip(prompts, candidates, scores, strict=True):
        judged = judged_candidates(prompt, cands, cand_scores, funnel)
        if cfg.label_by == "threshold":
            labels = [s >= cfg.threshold for s, _ in judged]
        else:
            labels = rank_labels([s for s, _ in judged], cfg.desirable_fraction)
        found = [example_record(prompt, c, s, label) for (s, c), label in zip(judged, labels) if label is not None]
        funnel.unlabelled += len(judged) - len(found)
        funnel.desirable += sum(e["label"] for e in found)
        funnel.undesirable += sum(not e["label"] for e in found)
        funnel.prompts_used += bool(found)
        examples += found
    return examples, funnel


def example_record(prompt: Prompt, candidate: Candidate, score: float, desirable: bool) -> dict:
    # prompt/completion/label: TRL's unpaired preference format, so KTOTrainer reads the dataset as is.
    return {
        "prompt": prompt.messages,
        "completion": [{"role": "assistant", "content": candidate.text}],
        "label": bool(desirable),
        "prompt_id": prompt.id,
        "index": candidate.index,
        "completion_token_ids": candidate.token_ids,
        "completion_token_logprobs": candidate.token_logprobs,
        "score": float(score),
        "replay_from_round": None,  # set on replayed copies (see pairs.replay_pairs)
    }


def weight_balance(desirable: int, undesirable: int, desirable_weight: float, undesirable_weight: float) -> float | None:
    """λ_D·n_D / (λ_U·n_U): the KTO paper advises keeping it within [1, 4/3]. None without undesirable examples."""
    if undesirable == 0 or undesirable_weight == 0:
        return None
    return desirable_weight * desirable / (undesirable_weight * undesirable)
