"""The generate stage: K candidates per prompt from the current policy -> candidates.parquet;
with a remote judge, in slices that are judged while the next slice generates. With
an in-process backend under several processes every process calls it and generates its
share (engines.ranks); the main process alone judges and saves."""

from __future__ import annotations

import logging

from online_dpo.campaign import Campaign, once, timed
from online_dpo.engines.generate import Completion, Sampling
from online_dpo.errors import StaleWeightsError
from online_dpo.pairs import Candidate
from online_dpo.rundir import read_parquet, write_jsonl, write_parquet
from online_dpo.seeds import stable_seed
from online_dpo.stages.judge import Judgments, judge_candidates, save_judgments, scores_of, stage_judge

log = logging.getLogger("online_dpo")


def generate_and_judge(c: Campaign, r: int, prompts, timings: dict) -> tuple[list[list[Candidate]], list[list] | None]:
    """The round's candidates and their scores: generated then judged, or, for a judge that
    waits on a remote API, judged slice by slice while generation goes on. Scores are None
    on the processes that only generate."""
    if c.overlap_judging and not c.run.is_done(r, "generate"):
        return stage_generate_while_judging(c, r, prompts, timings)
    with timed("generate", timings):
        candidates = stage_generate(c, r, prompts)
    if not c.is_main:
        return candidates, None
    with timed("judge", timings):
        scores = stage_judge(c, r, prompts, candidates)
    return candidates, scores


def prefetch_next_round(c: Campaign, r: int):
    """generation.async_rounds=1: round r+1's candidates, generated in a background thread by
    the weights the servers hold now (round r's starting policy) while round r's update runs:
    one round off-policy. The generator stays reserved until they are saved, so the push after
    the update waits for them. Returns the Future (its result re-raises a failure), or None."""
    from concurrent.futures import ThreadPoolExecutor

    nxt = r + 1
    if not c.cfg.generation.async_rounds or nxt >= c.cfg.rounds or c.run.is_done(nxt, "generate"):
        return None
    prompts = c.split.round_prompts(nxt, c.cfg.data.train_prompts_per_round)
    write_jsonl(c.run.round_paths(nxt).prompts, [p.to_record() for p in prompts])
    log.info("round %d generate (async): by %s while round %d's update runs", nxt, c.generator.version, r)
    c.generator.busy.acquire()  # taken here, not in the thread, so no push can slip in before it starts

    def generate_next() -> None:
        try:
            stage_generate(c, nxt, prompts)
        finally:
            c.generator.busy.release()

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="async-generate")
    future = pool.submit(generate_next)
    pool.shutdown(wait=False)
    return future


def completion_rows(prompts, completions: list[list[Completion]]) -> list[dict]:
    return [{"prompt_id": p.id, "index": i, "text": c.text, "token_ids": c.token_ids, "finish_reason": c.finish_reason,
             "token_logprobs": c.logprobs, "weight_version": c.weight_version}
            for p, cs in zip(prompts, completions) for i, c in enumerate(cs)]


def rows_to_candidates(prompts, rows: list[dict]) -> list[list[Candidate]]:
    by_prompt: dict[str, list[Candidate]] = {p.id: [] for p in prompts}
    for row in rows:
        logprobs = row.get("token_logprobs")  # absent in runs saved before they were kept
        by_prompt[row["prompt_id"]].append(Candidate(row["prompt_id"], row["index"], row["text"],
                                                     list(row["token_ids"]), row["finish_reason"],
                                                     list(logprobs) if logprobs is not None else None))
    return [sorted(by_prompt[p.id], key=lambda c: c.index) for p in prompts]


def stage_generate(c: Campaign, r: int, prompts) -> list[list[Candidate]]:
    """K samples per prompt from the current policy -> candidates.parquet."""
    def generate() -> list[dict]:
        log.info("round %d generate: %d prompts x %d samples", r, len(prompts), c.cfg.generation.samples_per_prompt)
        rows = completion_rows(prompts, c.round_generator.generate(prompts, train_sampling(c, r)))
        if c.is_main:
            save_candidates(c, r, rows)
        return rows

    rows = once(c.run, r, "generate", generate, lambda: read_parquet(c.run.round_paths(r).candidates))
    return rows_to_candidates(prompts, rows)


def train_sampling(c: Campaign, r: int, *slice_index: int) -> Sampling:
    """The K-candidate sampling of round r (of one slice of it, when judging overlaps generation)."""
    g = c.cfg.generation
    return Sampling(g.samples_per_prompt, g.temperature, g.top_p, g.max_new_tokens,
                    stable_seed(c.cfg.seed, r, "train-generate", *slice_index),
                    logprobs=c.reference_source == "generation")


def save_candidates(c: Campaign, r: int, rows: list[dict]) -> None:
    """The round's candidates, all sampled by one policy version (recorded with the marker)."""
    versions = sorted({row["weight_version"] for row in rows}, key=str)
    if len(versions) > 1:
        raise StaleWeightsError(", ".join(c.cfg.servers.urls) or c.cfg.generation.backend,
                                f"round {r}'s candidates come from several policy versions {versions}; they are "
                                f"refused (resume regenerates the round)")
    write_parquet(c.run.round_paths(r).candidates, rows)
    c.run.mark_done(r, "generate", candidates=len(rows), policy_version=versions[0] if versions else None)


def stage_generate_while_judging(c: Campaign, r: int, prompts, timings: dict):
    """Generate and judge at once: the round's prompts go to the generator in
    judge.overlap_chunks slices, and each slice is judged in a background thread while the
    next one generates, so a remote judge's latency hides behind generation. Writes the
    same candidates.parquet and judgments.parquet, with the same markers, as the two stages
    one after the other. Each slice has its own seed, so a resumed round regenerates the same
    candidates and a caching judge answers them from its cache. timings: "generate" is the
    generation wall time, "judge" the wait for the judge after the last slice. A process that
    only generates (any but the main one) takes part in each slice and returns (candidates, None)."""
    from concurrent.futures import ThreadPoolExecutor

    g = c.cfg.generation
    size = -(-len(prompts) // c.cfg.judge.overlap_chunks)
    slices = [prompts[i:i + size] for i in range(0, len(prompts), size)]
    log.info("round %d generate: %d prompts x %d samples in %d slices, each judged while the next generates",
             r, len(prompts), g.samples_per_prompt, len(slices))
    rows, futures = [], []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="judge") as pool:
        with timed("generate", timings):
            for k, part in enumerate(slices):
                part_rows = completion_rows(part, c.round_generator.generate(part, train_sampling(c, r, k)))
                rows += part_rows
                if c.is_main:
                    futures.append(pool.submit(judge_candidates, c, r, part, rows_to_candidates(part, part_rows),
                                               f" (slice {k + 1}/{len(slices)})"))
            if not c.is_main:
                return rows_to_candidates(prompts, rows), None
            save_candidates(c, r, rows)
        with timed("judge", timings):  # only the wait after the last slice: the rest overlapped generation
            judgments = Judgments()
            for f in futures:
                judgments.extend(f.result())  # re-raises a judge error (e.g. its budget)
            candidates = rows_to_candidates(prompts, rows)
            judged = save_judgments(c, r, prompts, candidates, judgments)
    return candidates, scores_of(judged, candidates)
