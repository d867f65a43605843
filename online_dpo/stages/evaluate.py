"""The evaluate stage: held-out responses of the initial policy (once) and of each round's,
judged against the initial and the previous policy, the diversity watch, and the round's
record (eval.json) that the report reads."""

from __future__ import annotations

import copy
import logging

from judges import as_pairwise
from judges.base import PointwiseItem, PointwiseScorer, scores_or_errors, template_hashes
from judges.base import judge_stats as judge_stats_of
from judges.verifiers import FinalAnswerVerifier
from online_dpo import diversity, evaluate
from online_dpo.campaign import Campaign, guard_verdict, last_checkpoint, once, timed
from online_dpo.engines.generate import Sampling
from online_dpo.errors import JudgeUnusableError
from online_dpo.report.view import judge_error_counts
from online_dpo.rundir import read_jsonl, write_json, write_jsonl
from online_dpo.seeds import stable_seed
from online_dpo.stages.select import round_judge_quality

log = logging.getLogger("online_dpo")


def generate_eval(c: Campaign, seed: int, save_to=None) -> tuple[list[str], list[int]]:
    """One response per held-out prompt: (texts, token counts), also saved as JSONL to `save_to` if given."""
    sampling = Sampling(1, c.cfg.eval.temperature, 1.0, c.cfg.eval.max_new_tokens, seed)
    outs = c.generator.generate(c.split.eval, sampling)
    texts, lengths = [o[0].text for o in outs], [len(o[0].token_ids) for o in outs]
    if save_to is not None:
        write_jsonl(save_to, [{"prompt_id": p.id, "text": t, "tokens": n} for p, t, n in zip(c.split.eval, texts, lengths)])
    return texts, lengths


def measure_diversity(c: Campaign, seed: int, save_to) -> dict | None:
    """The diversity watch: eval.diversity_samples samples for each of the first
    eval.diversity_prompts held-out prompts, with their log-probs -> `diversity.diversity_metrics`.
    The samples are saved as JSONL to `save_to`. None when the watch is off."""
    e = c.cfg.eval
    prompts = c.split.eval[: e.diversity_prompts]
    if not prompts:
        return None
    sampling = Sampling(e.diversity_samples, e.temperature, 1.0, e.max_new_tokens, seed, logprobs=True)
    outs = c.generator.generate(prompts, sampling)
    write_jsonl(save_to, [{"prompt_id": p.id, "index": i, "text": o.text, "token_ids": o.token_ids, "logprobs": o.logprobs}
                          for p, samples in zip(prompts, outs) for i, o in enumerate(samples)])
    return diversity.diversity_metrics([[o.text for o in samples] for samples in outs],
                                       [[o.logprobs for o in samples] for samples in outs])


def pass_scorer(c: Campaign) -> tuple[str, PointwiseScorer] | None:
    """The pointwise scorer of the pass rate, and its name: eval.judge where it scores each answer,
    else the reference check where every held-out prompt carries a reference, else the training
    judge where it scores each answer; None where there is none."""
    if c.cfg.eval.judge is not None and isinstance(c.eval_judge, PointwiseScorer):
        return c.cfg.eval.judge.name, c.eval_judge
    if c.split.eval and all(p.reference is not None for p in c.split.eval):
        return "reference", FinalAnswerVerifier()
    if isinstance(c.judge, PointwiseScorer):
        return getattr(c.judge, "name", type(c.judge).__name__), c.judge
    return None


def measure_pass(c: Campaign, texts: list[str]) -> dict | None:
    """The held-out answers' pass rate (`evaluate.pass_rate`) by `pass_scorer`, with its name."""
    chosen = pass_scorer(c)
    if chosen is None:
        return None
    name, scorer = chosen
    items = [PointwiseItem(p.text, t, p.reference) for p, t in zip(c.split.eval, texts, strict=True)]
    return {"scorer": name, **evaluate.pass_rate(scores_or_errors(scorer, items), c.cfg.eval.pass_score)}


def baseline(c: Campaign) -> dict:
    """The round-0 policy's eval responses and diversity: measured once, reused by every round."""
    paths, done = c.run.baseline, c.run.manifest["rounds"]

    def measure_eval() -> list[str]:
        texts, _ = generate_eval(c, stable_seed(c.cfg.seed, "baseline-eval"), save_to=paths.eval_responses)
        c.run.mark_done("baseline", "eval", accuracy=evaluate.accuracy(c.split.eval, texts))
        return texts

    texts = once(c.run, "baseline", "eval", measure_eval, lambda: [row["text"] for row in read_jsonl(paths.eval_responses)])
    base = {"texts": texts, "accuracy": done["baseline"]["eval"]["accuracy"]}
    if c.cfg.eval.enabled:
        once(c.run, "baseline", "pass", lambda: c.run.mark_done("baseline", "pass", result=measure_pass(c, texts)),
             lambda: None)
        base["pass"] = done["baseline"]["pass"]["result"]
    if not (c.cfg.eval.enabled and c.cfg.eval.diversity_prompts):
        return base
    if not c.run.is_done("baseline", "diversity") and last_checkpoint(c.run, c.cfg.rounds) is not None:
        # A run started before the diversity watch existed: the generator now holds a later
        # round's weights, so measuring "the initial policy" here would measure the wrong one.
        log.warning("this run has no diversity measurement of its initial policy (it was started before "
                    "the diversity watch existed); the diversity watch is off for it")
        return base

    def measure_baseline_diversity() -> None:
        metrics = measure_diversity(c, stable_seed(c.cfg.seed, "baseline-diversity"), paths.diversity_samples)
        c.run.mark_done("baseline", "diversity", metrics=metrics)

    once(c.run, "baseline", "diversity", measure_baseline_diversity, lambda: None)
    base["diversity"] = done["baseline"]["diversity"]["metrics"]
    return base


def stage_eval(c: Campaign, r: int, base: dict, prev_texts: list[str] | None, timings: dict) -> dict | None:
    """Held-out responses of the updated policy, judged against the round-0 and previous
    policies, and its diversity (with a warning where it fell well below the initial policy's).
    None with eval.enabled=false."""
    if not c.cfg.eval.enabled:
        return None
    with timed("eval", timings):
        return held_out_eval(c, r, base, prev_texts)


def held_out_eval(c: Campaign, r: int, base: dict, prev_texts: list[str] | None) -> dict:
    log.info("round %d eval: %d held-out prompts", r, len(c.split.eval))
    paths = c.run.round_paths(r)
    texts, lengths = generate_eval(c, stable_seed(c.cfg.seed, r, "eval"), save_to=paths.eval_responses)
    # A judge apart from the training judge: its bill is the eval's (the training judge's stats
    # cover the whole round where it judges the eval too).
    apart = c.eval_judge is not c.judge and judge_stats_of(c.eval_judge) is not None
    stats_before = judge_stats(c.eval_judge) if apart else None
    result = evaluate.evaluate_round(as_pairwise(c.eval_judge), c.split.eval, texts, lengths, base["texts"],
                                     prev_texts if c.cfg.eval.compare_previous else None)
    passed = measure_pass(c, texts)
    if passed is not None:  # beside the initial policy's, which the best-policy link is held against
        result["pass"] = {**passed, "baseline_pass_rate": (base.get("pass") or {}).get("pass_rate")}
    stop_unless_judged(r, result, c.cfg.eval.max_judge_error_fraction)
    if apart:
        result["judge_stats"] = judge_stats_of(c.eval_judge).since(stats_before).as_dict()
    if base.get("diversity"):
        result["diversity"] = measure_diversity(c, stable_seed(c.cfg.seed, r, "diversity"), paths.diversity_samples)
        result["diversity_warnings"] = diversity.collapse_warnings(
            result["diversity"], base["diversity"], c.cfg.eval.diversity_warn_fraction, "the initial policy")
        for warning in result["diversity_warnings"]:
            log.warning("round %d: %s", r, warning)
    return result


def stop_unless_judged(r: int, held_out: dict, most: float) -> None:
    """Stop the round (JudgeUnusableError) where judge errors are over `most` of the comparisons
    against the initial or the previous policy: the eval would decide the round on too few."""
    for key, what in (("vs_baseline", "comparisons against the initial policy"),
                      ("vs_previous", "comparisons against the previous one"), ("pass", "answers scored for the pass rate")):
        d = held_out.get(key)
        if d and d["n"] and d["errors"] > most * d["n"]:
            first = "" if key == "pass" else \
                f" (the first: {next(row['error'] for row in held_out['comparisons'][key] if row['error'])})"
            raise JudgeUnusableError(r, f"{d['errors']} of {d['n']} held-out {what} were judge errors, over "
                                        f"eval.max_judge_error_fraction={most:g}{first}", stage="eval")


def judge_stats(judge):
    """A copy of a judge's running stats (API judges: requests, cache hits, cost), or None."""
    return copy.deepcopy(judge_stats_of(judge))


def record_round(c: Campaign, r: int, funnel, held_out: dict | None, train_metrics: list[dict], drift: dict | None,
                 stats_before, timings: dict, against_previous: bool) -> dict:
    """The round's record -> eval.json, and the round marked done (with the guard's verdict)."""
    counts = funnel.as_dict()
    result = {"round": r, c.objective.name: counts[c.objective.name], "replayed": funnel.replayed, "funnel": counts}
    if held_out is not None:
        result["eval"] = held_out
    if train_metrics:
        last = train_metrics[-1]
        result["train"] = {"steps": len(train_metrics), "final_loss": last["loss"],
                           "final_reward_margin": last["reward_margin"], "final_kl": last.get("kl"),
                           "final_pair_accuracy": last.get("pair_accuracy"),
                           "train_tokens_per_s": last["train_tokens_per_s"], "logp_drift": drift}
    judged = round_judge_quality(c, r)  # pairwise judges: consistency, ties, agreement with references, separation
    if judged is not None:
        result["judge_quality"] = judged
    result["judge_errors"] = judge_error_counts(result)
    if stats_before is not None:  # API judges: this round's requests, cache hits, cost, position consistency
        result["judge_stats"] = judge_stats_of(c.judge).since(stats_before).as_dict()
    templates = template_hashes(c.judge)  # LLM judges: which templates (by hash) produced this round's verdicts
    if templates is not None:
        result["judge_templates"] = templates
    result["timings"] = timings
    result["wall_s"] = sum(timings.values())
    if c.guard != "off":
        result["guard"] = guard_verdict(result["eval"], against_previous=against_previous)
    write_json(c.run.round_paths(r).eval_json, result)
    c.run.mark_done(r, "eval", wall_s=result["wall_s"], accepted=result.get("guard", {}).get("accepted", True))
    return result
