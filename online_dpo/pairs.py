"""Turning judged candidates into preference pairs, with a funnel of what was dropped.

Best-vs-worst of K: per prompt, the highest-scored candidate is chosen and the
lowest-scored is rejected. A prompt yields no pair when fewer than two candidates
have a usable score (judge errors) or the best and worst are within `min_margin`
(a tie: nothing to learn).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from online_dpo.config import PairsConfig
from online_dpo.data import Prompt


@dataclass
class Candidate:
    prompt_id: str
    index: int  # position among the prompt's K samples
    text: str
    token_ids: list[int]
    finish_reason: str


@dataclass
class Funnel:
    prompts: int = 0
    candidates: int = 0
    judged: int = 0  # candidates with a usable score
    judge_errors: int = 0
    pairs: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> prompts dropped

    def as_dict(self) -> dict:
        return {"prompts": self.prompts, "candidates": self.candidates, "judged": self.judged,
                "judge_errors": self.judge_errors, "pairs": self.pairs, "dropped": dict(self.dropped)}


def select_pairs(
    prompts: list[Prompt],
    candidates: list[list[Candidate]],
    scores: list[list[float | None]],
    cfg: PairsConfig,
) -> tuple[list[dict], Funnel]:
    """One best-vs-worst pair per prompt where the margin allows.

    Args: `candidates[i]` and `scores[i]` are the K candidates of `prompts[i]` and
    their scores (None where the judge failed). Returns pair records and the funnel.
    """
    if cfg.strategy != "best_vs_worst":
        raise ValueError(f"unknown pair strategy {cfg.strategy!r}")
    funnel = Funnel(prompts=len(prompts))
    pairs = []
    for prompt, cands, cand_scores in zip(prompts, candidates, scores, strict=True):
        funnel.candidates += len(cands)
        usable = [(s, c) for s, c in zip(cand_scores, cands) if s is not None]
        funnel.judged += len(usable)
        funnel.judge_errors += len(cands) - len(usable)
        if len(usable) < 2:
            funnel.dropped["fewer than 2 judged candidates"] += 1
            continue
        # Stable order: among equal scores the earliest sample wins, so runs are reproducible.
        best_score, best = max(usable, key=lambda sc: sc[0])
        worst_score, worst = min(usable, key=lambda sc: sc[0])
        margin = best_score - worst_score
        if margin <= cfg.min_margin:
            funnel.dropped["tie (margin <= min_margin)"] += 1
            continue
        pairs.append(pair_record(prompt, best, worst, best_score, worst_score))
    funnel.pairs = len(pairs)
    return pairs, funnel


def pair_record(prompt: Prompt, chosen: Candidate, rejected: Candidate, s_chosen: float, s_rejected: float) -> dict:
    # prompt/chosen/rejected in TRL's conversational format, so DPOTrainer reads the dataset as is.
    return {
        "prompt": prompt.messages,
        "chosen": [{"role": "assistant", "content": chosen.text}],
        "rejected": [{"role": "assistant", "content": rejected.text}],
        "prompt_id": prompt.id,
        "chosen_index": chosen.index,
        "rejected_index": rejected.index,
        "chosen_token_ids": chosen.token_ids,
        "rejected_token_ids": rejected.token_ids,
        "score_chosen": float(s_chosen),
        "score_rejected": float(s_rejected),
        "margin": float(s_chosen - s_rejected),
    }
