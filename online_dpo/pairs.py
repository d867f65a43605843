"""Turning judged candidates into preference pairs, with a funnel of what was dropped.

Per prompt, the K candidates with a usable score (not a judge error) are paired by
`PairsConfig.strategy`:

- best_vs_worst (default): the highest-scored candidate is chosen and the lowest-scored
  rejected; among equal scores the earliest sample wins. With `length_aware`, candidates
  within `length_tolerance` of the best count as equally good and the shortest of them is
  chosen; those within it of the worst count as equally bad and the longest is rejected.
- random: one pair drawn uniformly (seeded per prompt) from the pairs that clear the margin.
- all_above_margin: every pair (i, j) with score_i - score_j > min_margin, largest margins
  first, at most `max_pairs_per_prompt`.
- divpo (Lanchantin et al. 2025, "Diverse Preference Optimization"): among the candidates
  scored within `divpo_rho` x the prompt's score range of the best, the most diverse is
  chosen; among those within it of the worst, the least diverse is rejected. A candidate's
  diversity is its mean n-gram distance to the prompt's other candidates
  (`diversity.distance_to_others`), so the pairs reward being right in a new way and
  penalise the most repeated wrong answer, instead of sharpening onto one phrasing.

A prompt with no pair clearing `min_margin` is a tie: dropped, or (drop_ties=False) kept
as one pair with `chosen_prob` 0.5, which the DPO loss trains toward "equally good".
A prompt whose pairwise judge did not separate its candidates beyond chance (its round
robin's `separation` p-value above the round's level, `separation_level`) is a ranking of the
judge's noise: by `unseparated`, its pair is kept without the chosen-response NLL
(`chosen_nll_weight` 0), or the prompt is dropped before any strategy runs.
Every record carries `tie`, `chosen_prob` (1.0 for a real preference) and `chosen_nll_weight`
(the weight of its chosen response's NLL term in the update: 1.0, or 0.0 when unseparated).

`replay_pairs` draws earlier rounds' pairs to mix into an update (`replay_fraction`).
Everything here is a pure function of its inputs (and the seed passed in), so a resumed
campaign selects exactly the same pairs.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field

from online_dpo.config import PairsConfig
from online_dpo.data.prompts import Prompt
from online_dpo.diversity import distance_to_others
from online_dpo.seeds import stable_seed
from online_dpo.separation import is_unseparated

# Funnel drop reasons; funnel.json of earlier campaigns uses these exact strings.
TIE = "tie (margin <= min_margin)"
TOO_FEW_JUDGED = "fewer than 2 judged candidates"
UNSEPARATED = "judge did not separate the candidates (p > separation_alpha)"
STRATEGIES = ("best_vs_worst", "random", "all_above_margin", "divpo")


@dataclass
class Candidate:
    prompt_id: str
    index: int  # position among the prompt's K samples
    text: str
    token_ids: list[int]
    finish_reason: str
    # Each token's log-prob under the policy that sampled it (untempered), where the round
    # asked the generator for them (dpo.reference_logps=generation); else None.
    token_logprobs: list[float] | None = None


# A candidate with its usable score; the unit every selection rule works on.
Scored = tuple[float, Candidate]


@dataclass
class Funnel:
    """What happened to a round's prompts, from candidates to pairs.

    Invariants: candidates == judged + judge_errors; prompts == prompts_paired + sum(dropped).
    """

    prompts: int = 0
    candidates: int = 0
    judged: int = 0  # candidates with a usable score
    judge_errors: int = 0  # candidates whose score is None (or not a finite number)
    pairs: int = 0  # fresh pair records, kept ties included
    dropped: Counter = field(default_factory=Counter)  # reason -> prompts that yielded no pair
    prompts_paired: int = 0  # prompts that yielded at least one pair
    ties_kept: int = 0  # of `pairs`, the ties kept with chosen_prob 0.5 (drop_ties=False)
    without_nll: int = 0  # of `pairs`, those of prompts the judge did not separate (unseparated=no_nll)
    over_cap: int = 0  # all_above_margin: pairs that cleared the margin beyond max_pairs_per_prompt
    replayed: int = 0  # earlier rounds' pairs added to this round's update (the campaign sets it)

    def as_dict(self) -> dict:
        return {"prompts": self.prompts, "candidates": self.candidates, "judged": self.judged,
                "judge_errors": self.judge_errors, "pairs": self.pairs, "dropped": dict(self.dropped),
                "prompts_paired": self.prompts_paired, "ties_kept": self.ties_kept,
                "without_nll": self.without_nll, "over_cap": self.over_cap, "replayed": self.replayed}

    def summary(self) -> str:
        """One readable line for the log, e.g.

        24 prompts -> 192 candidates -> 190 judged (2 judge errors) -> 20 pairs from 20 prompts;
        dropped prompts: 3 tie (margin <= min_margin), 1 fewer than 2 judged candidates
        """
        notes = []
        if self.ties_kept:
            notes.append(f"{self.ties_kept} ties kept")
        if self.without_nll:
            notes.append(f"{self.without_nll} unseparated, without NLL")
        if self.over_cap:
            notes.append(f"{self.over_cap} more over max_pairs_per_prompt")
        if self.replayed:
            notes.append(f"+{self.replayed} replayed")
        pairs = f"{self.pairs} pairs from {self.prompts_paired} prompts" + (f" ({', '.join(notes)})" if notes else "")
        line = (f"{self.prompts} prompts -> {self.candidates} candidates -> {self.judged} judged "
                f"({self.judge_errors} judge errors) -> {pairs}")
        if self.dropped:
            # Largest drop first; the reason breaks count ties so the line is reproducible.
            reasons = sorted(self.dropped.items(), key=lambda kv: (-kv[1], kv[0]))
            line += "; dropped prompts: " + ", ".join(f"{n} {reason}" for reason, n in reasons)
        return line


def select_pairs(
    prompts: list[Prompt],
    candidates: list[list[Candidate]],
    scores: list[list[float | None]],
    cfg: PairsConfig,
    seed: int = 0,
    separation: list[float | None] | None = None,
    separation_level: float = 1.0,
) -> tuple[list[dict], Funnel]:
    """Preference pairs for one round, by `cfg.strategy`.

    Args: `candidates[i]` and `scores[i]` are the K candidates of `prompts[i]` and their
    scores (None where the judge failed). `separation[i]`: the p-value of prompts[i]'s
    round robin (`judges.ranking.separation_pvalue`; None, or no list: a scorer's scores,
    not tested); a prompt the judge did not separate at `separation_level` (the round's,
    `separation.separation_level`; 1.0: the test off) is dropped, or its pairs get
    `chosen_nll_weight` 0 (`cfg.unseparated`).
    `seed` drives the random strategy only (each prompt draws from a stream derived from
    (seed, prompt id), so the pick does not depend on the prompts' order); pass one derived
    from (campaign seed, round).
    Returns pair records and the funnel.
    """
    _check(cfg)
    funnel = Funnel(prompts=len(prompts))
    pairs = []
    separation = separation or [None] * len(prompts)
    for prompt, cands, cand_scores, p_value in zip(prompts, candidates, scores, separation, strict=True):
        usable = judged_candidates(prompt, cands, cand_scores, funnel)
        if len(usable) < 2:
            funnel.dropped[TOO_FEW_JUDGED] += 1
            continue
        unseparated = is_unseparated(p_value, separation_level)
        if unseparated and cfg.unseparated == "drop":
            funnel.dropped[UNSEPARATED] += 1
            continue
        rng = random.Random(stable_seed(seed, prompt.id)) if cfg.strategy == "random" else None
        length_tolerance = cfg.length_tolerance if cfg.length_aware else None

        if cfg.strategy == "best_vs_worst":
            found = _best_vs_worst(usable, cfg.min_margin, length_tolerance)
        elif cfg.strategy == "divpo":
            found = _divpo(usable, cfg.divpo_rho, cfg.min_margin)
        elif cfg.strategy == "random":
            eligible = pairs_above_margin(usable, cfg.min_margin)
            found = [rng.choice(eligible)] if eligible else []
        else:
            eligible = pairs_above_margin(usable, cfg.min_margin)
            funnel.over_cap += max(0, len(eligible) - cfg.max_pairs_per_prompt)
            found = eligible[: cfg.max_pairs_per_prompt]

        if found:
            weight = 0.0 if unseparated else 1.0
            pairs += [pair_record(prompt, c, r, s_c, s_r, chosen_nll_weight=weight) for (s_c, c), (s_r, r) in found]
            funnel.without_nll += len(found) if unseparated else 0
        elif cfg.drop_ties:
            funnel.dropped[TIE] += 1
            continue
        else:
            (s_c, c), (s_r, r) = _tie_pair(usable, length_tolerance, rng)
            pairs.append(pair_record(prompt, c, r, s_c, s_r, tie=True))
            funnel.ties_kept += 1
        funnel.prompts_paired += 1
    funnel.pairs = len(pairs)
    return pairs, funnel


def judged_candidates(prompt: Prompt, cands: list[Candidate], scores: list[float | None], funnel) -> list[Scored]:
    """One prompt's candidates with a usable score, in sample order; counts candidates, judged
    and judge errors on `funnel` (a Funnel or a labels.LabelFunnel)."""
    if len(cands) != len(scores):
        raise ValueError(f"prompt {prompt.id}: {len(cands)} candidates but {len(scores)} scores")
    usable = [(s, c) for s, c in zip(scores, cands) if _is_usable(s)]
    funnel.candidates += len(cands)
    funnel.judged += len(usable)
    funnel.judge_errors += len(cands) - len(usable)
    return usable


def deciding_band(cfg: PairsConfig) -> float:
    """How far below the best (above the worst) score a candidate can be and still make the
    best-vs-worst pair: length_tolerance where the choice is length-aware, else 0 (the extremes)."""
    return cfg.length_tolerance if cfg.length_aware else 0.0


def _check(cfg: PairsConfig) -> None:
    if cfg.separation_alpha != "auto" and not 0.0 < cfg.separation_alpha <= 1.0:
        raise ValueError(f"pairs.separation_alpha must be in (0, 1] or auto, got {cfg.separation_alpha!r}")
    if cfg.strategy not in STRATEGIES:
        raise ValueError(f"unknown pair strategy {cfg.strategy!r}; use one of {list(STRATEGIES)}")
    if cfg.min_margin < 0:
        # A negative margin would let a lower-scored candidate be "chosen".
        raise ValueError(f"pairs.min_margin must be >= 0, got {cfg.min_margin}")
    if cfg.length_aware and cfg.strategy != "best_vs_worst":
        raise ValueError(f"pairs.length_aware applies to strategy=best_vs_worst only, not {cfg.strategy!r}; "
                         "set pairs.length_aware=false or pairs.strategy=best_vs_worst")


def _is_usable(score: float | None) -> bool:
    # NaN would poison max/min and margins silently; treat it like a judge error.
    return score is not None and math.isfinite(score)


def _shortest(sc: Scored) -> tuple:
    return len(sc[1].token_ids), sc[1].index


def _longest(sc: Scored) -> tuple:
    return -len(sc[1].token_ids), sc[1].index


def _best_vs_worst(usable: list[Scored], min_margin: float, length_tolerance: float | None) -> list[tuple[Scored, Scored]]:
    """The best-vs-worst pair, or [] when even it does not clear the margin (a tie);
    length-aware within `length_tolerance` of the extremes unless it is None."""
    # max/min return the first of equal scores: the earliest sample wins, so runs reproduce.
    best = max(usable, key=lambda sc: sc[0])
    worst = min(usable, key=lambda sc: sc[0])
    if best[0] - worst[0] <= min_margin:
        return []
    if length_tolerance is None:
        return [(best, worst)]
    return [_length_aware_pair(usable, length_tolerance, min_margin)]


def _divpo(usable: list[Scored], rho: float, min_margin: float) -> list[tuple[Scored, Scored]]:
    """DivPO's pair: the most diverse near-best candidate vs the least diverse near-worst one,
    near meaning within rho x (best - worst) score; [] when best - worst does not clear the
    margin (a tie). Equal diversity goes to the earliest sample."""
    top, bottom = max(sc[0] for sc in usable), min(sc[0] for sc in usable)
    if top - bottom <= min_margin:
        return []
    band = rho * (top - bottom)
    distance = dict(zip((c.index for _, c in usable), distance_to_others([c.text for _, c in usable])))
    # Each band keeps only candidates whose pair with the other extreme clears the margin: the best
    # and the worst always do, so neither band is empty.
    chosen = max((sc for sc in usable if sc[0] >= top - band and sc[0] - bottom > min_margin),
                 key=lambda sc: (distance[sc[1].index], -sc[1].index))
    rejected = min((sc for sc in usable if sc[0] <= bottom + band and chosen[0] - sc[0] > min_margin),
                   key=lambda sc: (distance[sc[1].index], sc[1].index))
    return [(chosen, rejected)]


def _length_aware_pair(usable: list[Scored], tolerance: float, min_margin: float | None) -> tuple[Scored, Scored]:
    """The shortest near-best candidate vs the longest near-worst one (ties by index).

    With `min_margin` set (a real preference), only candidates that keep the pair's margin
    above it count, so the length preference never turns a preference into a tie: the
    best and the worst candidates themselves always qualify. With None (a kept tie), any
    near-worst candidate other than the chosen one does; there always is one.
    """
    top = max(sc[0] for sc in usable)
    bottom = min(sc[0] for sc in usable)

    def clears(high: float, low: float) -> bool:
        return min_margin is None or high - low > min_margin

    chosen = min((sc for sc in usable if sc[0] >= top - tolerance and clears(sc[0], bottom)), key=_shortest)
    rejected = min((sc for sc in usable if sc is not chosen and sc[0] <= bottom + tolerance
                    and clears(chosen[0], sc[0])), key=_longest)
    return chosen, rejected


def pairs_above_margin(usable: list[Scored], min_margin: float) -> list[tuple[Scored, Scored]]:
    """Every (chosen, rejected) with score difference > min_margin: largest margin first,
    then by chosen index and rejected index, so the order (and any cap) is reproducible."""
    found = [(hi, lo) for hi in usable for lo in usable if hi[0] - lo[0] > min_margin]
    found.sort(key=lambda p: (-(p[0][0] - p[1][0]), p[0][1].index, p[1][1].index))
    return found


def _tie_pair(usable: list[Scored], length_tolerance: float | None, rng: random.Random | None) -> tuple[Scored, Scored]:
    """The one pair a kept tie contributes; with chosen_prob 0.5 its direction does not matter."""
    if rng is not None:  # random strategy: any two distinct candidates, seeded
        first, second = rng.sample(range(len(usable)), 2)
        return usable[first], usable[second]
    if length_tolerance is not None:  # "the shortest and the longest are equally good": no reward for length
        return _length_aware_pair(usable, length_tolerance, None)
    best = max(usable, key=lambda sc: sc[0])
    return best, min((sc for sc in usable if sc is not best), key=lambda sc: sc[0])


def pair_record(prompt: Prompt, chosen: Candidate, rejected: Candidate, s_chosen: float, s_rejected: float,
                tie: bool = False, chosen_nll_weight: float = 1.0) -> dict:
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
        "chosen_token_logprobs": chosen.token_logprobs,
        "rejected_token_logprobs": rejected.token_logprobs,
        "score_chosen": float(s_chosen),
        "score_rejected": float(s_rejected),
        "margin": float(s_chosen - s_rejected),  # may be <= 0 for a kept tie
        "tie": tie,
        # The probability the DPO loss trains P(chosen > rejected) toward: a soft label.
        "chosen_prob": 0.5 if tie else 1.0,
        # The weight of the chosen response's NLL term (dpo.rpo_alpha) for this pair.
        "chosen_nll_weight": chosen_nll_weight,
        # Set on replayed copies (replay_pairs); present (None) on fresh pairs too, so a
        # mixed list keeps one schema when saved as a datasets.Dataset.
        "replay_from_round": None,
    }


def replay_count(fresh_count: int, fraction: float) -> int:
    """How many earlier pairs to add to `fresh_count` fresh ones so they are `fraction` of the update."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"pairs.replay_fraction must be in [0, 1), got {fraction}")
    if fresh_count < 0:
        raise ValueError(f"fresh_count must be >= 0, got {fresh_count}")
    return round(fraction * fresh_count / (1.0 - fraction))


def replay_pairs(earlier: list[list[dict]], fresh_count: int, fraction: float, seed: int) -> list[dict]:
    """Earlier rounds' pairs to mix into this round's update: seeded, without replacement.

    Args: `earlier[k]` holds round k's fresh pair records (rounds 0 .. r-1 for round r);
    records that are themselves replayed copies (replay_from_round set) are skipped, so a
    pair is never replayed twice into one update. `fresh_count`: this round's fresh pairs.
    Returns up to `replay_count(fresh_count, fraction)` copies (fewer when fewer exist), each
    with `replay_from_round` = k, in (round, position) order. Nothing when fresh_count is 0:
    a round without fresh pairs leaves the policy unchanged.
    """
    wanted = replay_count(fresh_count, fraction)
    pool = [(k, rec) for k, records in enumerate(earlier) for rec in records if rec.get("replay_from_round") is None]
    picked = sorted(random.Random(seed).sample(range(len(pool)), min(wanted, len(pool))))
    return [{**pool[i][1], "replay_from_round": pool[i][0]} for i in picked]
