"""The judge stage: a score (or a counted judge error) for every candidate -> judgments.parquet."""

from __future__ import annotations

import logging

from tqdm.auto import tqdm

from judges.ranking import CandidateGroup, score_groups
from online_dpo.campaign import Campaign, once
from online_dpo.rundir import read_parquet, write_parquet

log = logging.getLogger("online_dpo")
JUDGE_CHUNK = 16  # prompts per judge call


def stage_judge(c: Campaign, r: int, prompts, candidates) -> list[list[float | None]]:
    """A score (or None: judge error) per candidate -> judgments.parquet.

    Paid judges cache every reply as it arrives, so a crash mid-stage repeats no call.
    """
    judged = once(c.run, r, "judge",
                  lambda: save_judgments(c, r, prompts, candidates, judge_candidates(c, r, prompts, candidates)),
                  lambda: read_parquet(c.run.round_paths(r).judgments))
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
    write_parquet(c.run.round_paths(r).judgments, judged)
    c.run.mark_done(r, "judge", errors=sum(j["error"] is not None for j in judged))
    return judged


def scores_of(judged: list[dict], candidates) -> list[list[float | None]]:
    score_of = {(j["prompt_id"], j["index"]): j["score"] for j in judged}
    return [[score_of[(x.prompt_id, x.index)] for x in cs] for cs in candidates]
