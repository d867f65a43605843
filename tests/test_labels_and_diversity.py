"""KTO's labelling of judged candidates and the diversity watch: pure functions, hand-computed values."""

import math

import pytest

from online_dpo.config import ConfigError, KTOConfig, load_config
from online_dpo.data import Prompt
from online_dpo.diversity import (
    collapse_warnings,
    distinct_n,
    diversity_metrics,
    mean_token_entropy,
    pairwise_overlap,
)
from online_dpo.labels import label_candidates, rank_labels, weight_balance
from online_dpo.pairs import Candidate


def group(pid: str, n: int) -> list[Candidate]:
    return [Candidate(pid, i, f"answer {i}", [10 + i, 2], "stop") for i in range(n)]


def prompt(pid: str) -> Prompt:
    return Prompt(id=pid, messages=[{"role": "user", "content": f"question {pid}"}])


# --- labelling -------------------------------------------------------------------------

def test_threshold_labels_every_judged_candidate_and_skips_errors():
    prompts = [prompt("a"), prompt("b")]
    cands = [group("a", 4), group("b", 3)]
    scores = [[1.0, 0.0, None, 0.5], [0.0, math.nan, 0.0]]
    examples, funnel = label_candidates(prompts, cands, scores, KTOConfig(label_by="threshold", threshold=0.5))
    assert [(e["prompt_id"], e["index"], e["label"]) for e in examples] == [
        ("a", 0, True), ("a", 1, False), ("a", 3, True), ("b", 0, False), ("b", 2, False)]
    assert funnel.as_dict() == {"prompts": 2, "candidates": 7, "judged": 5, "judge_errors": 2, "examples": 5,
                                "desirable": 2, "undesirable": 3, "unlabelled": 0, "prompts_used": 2, "replayed": 0}
    # TRL's unpaired format, plus what the update and the tests need
    e = examples[0]
    assert e["completion"] == [{"role": "assistant", "content": "answer 0"}] and e["prompt"] == prompts[0].messages
    assert e["completion_token_ids"] == [10, 2] and e["score"] == 1.0 and e["replay_from_round"] is None
    assert "5 examples (2 desirable, 3 undesirable) from 2 prompts" in funnel.summary()


def test_rank_labels_never_split_equal_scores():
    # a 0/1 verifier with 2 right of 8: the cut moves to the only boundary, 2 desirable / 6 undesirable
    assert rank_labels([1, 0, 0, 1, 0, 0, 0, 0], 0.5) == [True, False, False, True, False, False, False, False]
    # distinct scores: the top half exactly
    assert rank_labels([0.1, 0.9, 0.5, 0.3], 0.5) == [False, True, True, False]
    # target 2 of 4 sits inside the tie at 0.5; boundaries at 1 and 3 are equally near: the smaller wins
    assert rank_labels([0.9, 0.5, 0.5, 0.1], 0.5) == [True, False, False, False]
    # a smaller desirable_fraction moves the cut up
    assert rank_labels([0.1, 0.9, 0.5, 0.3, 0.7], 0.2) == [False, True, False, False, False]
    # all tied (or one candidate): nothing to learn from
    assert rank_labels([0.4, 0.4, 0.4], 0.5) == [None, None, None]
    assert rank_labels([0.7], 0.5) == [None]


def test_rank_funnel_counts_all_tied_prompts_as_unlabelled():
    prompts = [prompt("a"), prompt("b")]
    examples, funnel = label_candidates(prompts, [group("a", 3), group("b", 3)], [[1.0, 1.0, 1.0], [0.2, 0.8, None]],
                                        KTOConfig(label_by="rank"))
    assert [(e["prompt_id"], e["index"], e["label"]) for e in examples] == [("b", 0, False), ("b", 1, True)]
    assert (funnel.unlabelled, funnel.prompts_used, funnel.judge_errors) == (3, 1, 1)
    assert funnel.judged == funnel.examples + funnel.unlabelled


def test_weight_balance_and_config_checks():
    assert weight_balance(2, 6, 1.0, 1.0) == pytest.approx(1 / 3)
    assert weight_balance(2, 6, 3.0, 1.0) == pytest.approx(1.0)
    assert weight_balance(5, 0, 1.0, 1.0) is None
    assert load_config(None, ["dpo.loss=kto", "kto.label_by=rank"]).kto.label_by == "rank"
    with pytest.raises(ConfigError, match="kto.desirable_fraction"):
        load_config(None, ["dpo.loss=kto", "kto.desirable_fraction=1.0"])
    with pytest.raises(ConfigError, match="rpo_alpha"):
        load_config(None, ["dpo.loss=kto", "dpo.rpo_alpha=0.5"])
    with pytest.raises(ConfigError, match="diversity_samples"):
        load_config(None, ["eval.diversity_samples=1"])


# --- diversity -------------------------------------------------------------------------

def test_distinct_n_by_hand():
    texts = ["the cat sat", "the cat ran"]
    # unigrams: the cat sat the cat ran -> 4 distinct of 6; bigrams: (the cat) x2, (cat sat), (cat ran) -> 3 of 4
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n(["Same.", "same ."], 1) == pytest.approx(2 / 4)  # lower-cased; punctuation is a word
    assert distinct_n(["", ""], 1) is None


def test_pairwise_overlap_by_hand():
    assert pairwise_overlap(["a b c", "a b c"]) == 1.0
    assert pairwise_overlap(["a b", "c d"]) == 0.0
    # "a b c" vs "a b d": unigrams 2/4, bigrams 1/3, trigrams 0/2, 4-grams none (skipped)
    assert pairwise_overlap(["a b c", "a b d"]) == pytest.approx((2 / 4 + 1 / 3 + 0) / 3)
    # three samples: the mean over the 3 pairs
    assert pairwise_overlap(["x", "x", "y"]) == pytest.approx((1 + 0 + 0) / 3)
    assert pairwise_overlap(["only one"]) is None


def test_mean_token_entropy_is_token_weighted():
    lps = [[math.log(0.5), math.log(0.5)], [math.log(0.25)]]
    assert mean_token_entropy(lps) == pytest.approx((2 * math.log(2) + math.log(4)) / 3)
    assert mean_token_entropy([[]]) is None


def test_diversity_metrics_and_collapse_warning():
    varied = [["one two", "three four"], ["red", "blue"]]
    same = [["one two", "one two"], ["red", "red"]]
    lp_varied = [[[-2.0, -2.0], [-2.0, -2.0]], [[-1.0], [-1.0]]]
    lp_same = [[[-0.1, -0.1], [-0.1, -0.1]], [[-0.1], [-0.1]]]
    base = diversity_metrics(varied, lp_varied)
    assert base["distinct_1"] == 1.0 and base["distinct_2"] == 1.0 and base["pairwise_overlap"] == 0.0
    assert base["token_entropy"] == pytest.approx((4 * 2.0 + 2 * 1.0) / 6)  # token-weighted
    assert (base["prompts"], base["samples_per_prompt"]) == (2, 2)
    collapsed = diversity_metrics(same, lp_same)
    assert collapsed["distinct_1"] == 0.5 and collapsed["pairwise_overlap"] == 1.0
    warnings = collapse_warnings(collapsed, base, 0.6, "the initial policy")
    assert len(warnings) == 4  # distinct-1 0.5 < 0.6, distinct-2 0.5, entropy 0.1 of 1.67, 1 - overlap 0 of 1
    assert warnings[0].startswith("diversity collapsing: distinct_1 0.500 is 50% of the initial policy's 1.000")
    assert collapse_warnings(base, base, 0.6) == []  # unchanged diversity: no warning
    assert collapse_warnings(collapsed, base, 0.0) == []  # fraction 0 turns the warning off
