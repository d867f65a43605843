"""The judge stage: a score (or a counted judge error) for every candidate -> judgments.parquet,
and, for a pairwise judge, the round robin's verdicts they come from -> comparisons.parquet."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from judges.base import Score
from judges.ranking import CandidateGroup, round_robin_games, score_groups
from online_dpo.campaign import Campaign, once
from online_dpo.errors import JudgeUnusableError
from online_dpo.pairs import deciding_band
from online_dpo.rundir import read_parquet, write_parquet

log = logging.getLogger("online_dpo")
JUDGE_CHUNK = 16  # prompts per judge call


@dataclass
class Judgments:
    """The judge's output for some prompts, in prompt order: a `Score` per candidate, and for a
    pairwise judge every verdict of each prompt's round robin (empty lists for a scorer)."""

    scores: list[list[Score]] = field(default_factory=list)
    games: list[list[dict]] = field(default_factory=list)  # per prompt: {i, j, winner, error, position_consistent, prob_a}

    def extend(self, more: "Judgments") -> "Judgments":
        self.scores += more.scores
        self.games += more.games
        return self


def stage_judge(c: Campaign, r: int, prompts, candidates) -> list[list[float | None]]:
    """A score (or None: judge error) per candidate -> judgments.parquet (+ comparisons.parquet).

    Paid judges cache every reply as it arrives, so a crash mid-stage repeats no call.
    """
    judged = once(c.run, r, "judge",
                  lambda: save_judgments(c, r, prompts, candidates, judge_candidates(c, r, prompts, candidates)),
                  lambda: read_parquet(c.run.round_paths(r).judgments))
    return scores_of(judged, candidates)


def judge_candidates(c: Campaign, r: int, prompts, candidates, part: str = "") -> Judgments:
    """The judge's `Judgments` of every candidate, in chunks of JUDGE_CHUNK prompts, so a slow
    judge (an API, a local LLM) shows progress as it goes."""
    groups = [CandidateGroup(p.text, [x.text for x in cs], p.reference) for p, cs in zip(prompts, candidates)]
    out = Judgments()
    chunks = range(0, len(groups), JUDGE_CHUNK)
    for n, i in enumerate(tqdm(chunks, desc=f"round {r} judging{part}", unit="chunk", leave=False)):
        log.info("round %d judge%s: chunk %d/%d", r, part, n + 1, len(chunks))
        chunk = groups[i : i + JUDGE_CHUNK]
        scores, verdicts = score_groups(c.judge, chunk, c.second_order, deciding_band(c.cfg.pairs))
        out.extend(Judgments(scores, games_of(chunk, verdicts)))
    return out


def games_of(groups: list[CandidateGroup], verdicts: list) -> list[list[dict]]:
    """`score_groups`'s flat round-robin verdicts, one list per group ([] each for a scorer)."""
    if not verdicts:
        return [[] for _ in groups]
    out, k = [], 0
    for g in groups:
        games = round_robin_games(len(g.responses))
        out.append([{"i": i, "j": j, "winner": v.winner, "error": v.error, "prob_a": v.prob_a,
                     "position_consistent": v.position_consistent}
                    for (i, j), v in zip(games, verdicts[k : k + len(games)], strict=True)])
        k += len(games)
    return out


def save_judgments(c: Campaign, r: int, prompts, candidates, judgments: Judgments) -> list[dict]:
    """The round's judgments -> judgments.parquet (+ comparisons.parquet), then the stage's marker.
    A round the judge could not judge at all stops here, before anything is saved: resume judges it again."""
    judged = [{"prompt_id": p.id, "index": x.index, "score": s.value, "error": s.error, "raw": s.raw}
              for p, cs, ss in zip(prompts, candidates, judgments.scores) for x, s in zip(cs, ss)]
    games = [{"prompt_id": p.id, **g} for p, gs in zip(prompts, judgments.games) for g in gs]
    check_usable(r, judged, games)
    paths = c.run.round_paths(r)
    if games:
        write_parquet(paths.comparisons, games)
    write_parquet(paths.judgments, judged)
    c.run.mark_done(r, "judge", errors=sum(j["error"] is not None for j in judged))
    return judged


def check_usable(r: int, judged: list[dict], games: list[dict]) -> None:
    """Stop the round when its judgments can teach nothing: every score an error, or (a pairwise
    judge) every verdict a tie or an error, or every verdict asked in both orders one. Training
    on them would train on the judge's failure.

    The last one is a judge that never named the same response in both orders (it follows the
    position): under judge.second_order=deciding its games asked once still look decisive, but
    the pairs come from the games asked both ways."""
    if judged and all(j["error"] is not None for j in judged):
        first = next(j["error"] for j in judged)
        raise JudgeUnusableError(r, f"all {len(judged)} candidates got a judge error (the first: {first})")
    both_orders = [g for g in games if g.get("position_consistent") is not None]
    for which, among in (("", games), (" asked in both orders", both_orders)):
        if among and all(g["winner"] in (None, "tie") for g in among):
            ties = sum(g["winner"] == "tie" for g in among)
            raise JudgeUnusableError(r, f"all {len(among)} comparisons{which} were ties ({ties}) or errors "
                                        f"({len(among) - ties}); the judge separated no two candidates")


def scores_of(judged: list[dict], candidates) -> list[list[float | None]]:
    score_of = {(j["prompt_id"], j["index"]): j["score"] for j in judged}
    return [[score_of[(x.prompt_id, x.index)] for x in cs] for cs in candidates]
