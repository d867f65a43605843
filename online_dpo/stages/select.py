"""The select stage: the round's fresh training records from judged candidates (pairs, or
KTO's labelled examples: the campaign's `Objective` decides), the draw replayed from earlier
rounds, and the funnel of what was kept and dropped."""

from __future__ import annotations

import logging

from online_dpo import judge_quality as quality
from online_dpo import labels
from online_dpo.campaign import Campaign
from online_dpo.evaluate import correctness
from online_dpo.pairs import Funnel, replay_pairs
from online_dpo.rundir import atomic_path, read_parquet, write_json, write_jsonl
from online_dpo.seeds import stable_seed
from online_dpo.separation import explain_level, reported_separation_level, separation_level
from online_dpo.stages.generate import rows_to_candidates

log = logging.getLogger("online_dpo")


def stage_pairs(c: Campaign, r: int, prompts, candidates, scores) -> Funnel | labels.LabelFunnel:
    """The round's training data: fresh preference pairs -> pairs/ (an HF dataset, TRL's
    conversational format) or, for KTO's objective, fresh labelled examples -> examples/ (TRL's
    unpaired format); the draw from earlier rounds' -> replay.jsonl; and the
    funnel of what was kept and dropped -> funnel.json. Selection, labelling and replay are
    pure functions of saved inputs and seeds, so on resume they are recomputed and equal what
    was saved.
    """
    objective, paths = c.objective, c.run.round_paths(r)
    games = round_games(c, r)
    level, reference = round_separation_level(c, prompts, candidates, games)
    if line := explain_level(c.cfg.pairs, level, quality.flip_rate_bound(reference), reference):
        log.info("round %d %s", r, line)
    # The p-values only where the test acts on the pairs (the judge-quality summary computes its own).
    separation = round_separation(c, r, prompts, candidates, games) if level < 1.0 else None
    fresh, funnel = objective.select(prompts, candidates, scores, seed=stable_seed(c.cfg.seed, r, "pairs"),
                                     separation=separation, separation_level=level)
    replayed = replayed_pairs(c, r, len(fresh))
    funnel.replayed = len(replayed)
    if not c.run.is_done(r, "pairs"):
        from datasets import Dataset

        with atomic_path(paths.records(objective.name), is_dir=True) as tmp:
            Dataset.from_list(fresh).save_to_disk(str(tmp))
        write_jsonl(paths.replay, [{k: p[k] for k in objective.replay_keys} for p in replayed])
        write_json(paths.funnel, funnel.as_dict())
        c.run.mark_done(r, "pairs", pairs=len(fresh), replayed=len(replayed))
    log.info("round %d %s: %s", r, objective.name, funnel.summary())
    return funnel


def round_games(c: Campaign, r: int) -> list[dict]:
    """Round r's round-robin verdicts (comparisons.parquet); [] for a pointwise judge."""
    path = c.run.round_paths(r).comparisons
    return read_parquet(path) if path.exists() else []


def round_separation(c: Campaign, r: int, prompts, candidates, games: list[dict]) -> list[float | None] | None:
    """Each prompt's round-robin separation p-value from round r's verdicts `games`
    (`round_games`; pairwise judges), seeded per round."""
    return quality.separation_pvalues(prompts, candidates, games, seed=stable_seed(c.cfg.seed, r, "separation"))


def round_separation_level(c: Campaign, prompts, candidates, games: list[dict]) -> tuple[float, dict | None]:
    """The level a round's separation test acts at (`separation.separation_level`), from the
    round's verdicts `games` on its `candidates`; and the judge's agreement with the reference
    answers it was chosen from (`judge_quality.agreement`; None without references). Without
    round robins (a pointwise judge), or for an objective that does not use the test (KTO):
    1.0, None."""
    if not games or not c.objective.tests_separation:
        return 1.0, None
    correct = reference_correctness(prompts, candidates)
    reference = None if correct is None else quality.agreement([g for g in games if g["error"] is None], correct)
    k = c.cfg.generation.samples_per_prompt
    return separation_level(c.cfg.pairs, k, quality.flip_rate_bound(reference)), reference


def reference_correctness(prompts, candidates) -> dict[tuple[str, int], float] | None:
    """(prompt id, candidate index) -> 1.0 / 0.0 against the prompts' reference answers; None
    unless every prompt has one."""
    if not all(p.reference is not None for p in prompts):
        return None
    flat = [(p, x) for p, cs in zip(prompts, candidates) for x in cs]
    truth = correctness([p for p, _ in flat], [x.text for _, x in flat])
    return {(x.prompt_id, x.index): t for (_, x), t in zip(flat, truth)}


def round_judge_quality(c: Campaign, r: int) -> dict | None:
    """What round r's verdicts show of a pairwise judge's quality (online_dpo.judge_quality),
    logged with a warning where the judge looks no better than chance; None for a scorer."""
    games = round_games(c, r)
    if not games:
        return None
    prompts = c.split.round_prompts(r, c.cfg.data.train_prompts_per_round)
    candidates = rows_to_candidates(prompts, read_parquet(c.run.round_paths(r).candidates))
    acted_at, _ = round_separation_level(c, prompts, candidates, games)
    levels = [(p, reported_separation_level(acted_at, len(cs)))
              for p, cs in zip(round_separation(c, r, prompts, candidates, games), candidates) if p is not None]
    tested = [(p, level) for p, level in levels if level is not None]
    found = quality.judge_quality(games, reference_correctness(prompts, candidates),
                                  separated=sum(p <= level for p, level in tested), tested=len(tested),
                                  separation_level=acted_at)
    alpha = max((level for _, level in tested), default=None)
    log.info("round %d %s", r, quality.summary(found))
    found["warnings"] = quality.quality_warnings(found, alpha)
    for warning in found["warnings"]:
        log.warning("round %d: %s", r, warning)
    return found


def round_pairs(c: Campaign, r: int) -> list[dict]:
    """Round r's fresh pairs (or labelled examples, for KTO), read back from its run directory.
    The manifest's "pairs" marker counts either."""
    from datasets import load_from_disk

    if c.run.manifest["rounds"][str(r)]["pairs"]["pairs"] == 0:
        return []  # `datasets` saves an empty dataset but cannot load one back
    return load_from_disk(str(c.run.round_paths(r).records(c.objective.name))).to_list()


def replayed_pairs(c: Campaign, r: int, fresh_count: int) -> list[dict]:
    """With pairs.replay_fraction > 0: a seeded draw from earlier rounds' pairs (examples) for this update."""
    if c.cfg.pairs.replay_fraction <= 0 or r == 0 or fresh_count == 0:
        return []
    earlier = [round_pairs(c, q) for q in range(r)]
    return replay_pairs(earlier, fresh_count, c.cfg.pairs.replay_fraction, stable_seed(c.cfg.seed, r, "replay"))


def training_set(c: Campaign, r: int) -> list[dict]:
    """The round's update data, read from the run directory: fresh pairs (examples) + replayed ones."""
    fresh = round_pairs(c, r)
    return fresh + replayed_pairs(c, r, len(fresh))
