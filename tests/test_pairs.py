"""Pair selection (strategies, margins, ties, length-aware picks), the funnel, and replay."""

import random

import pytest

from online_dpo.config import DataConfig, PairsConfig
from online_dpo.data import Prompt, load_prompts
from online_dpo.pairs import (
    TIE,
    TOO_FEW_JUDGED,
    Candidate,
    replay_count,
    replay_pairs,
    select_pairs,
)


def _prompts(n):
    return [Prompt(id=f"p{i}", messages=[{"role": "user", "content": f"q{i}"}]) for i in range(n)]


def _cands(pid, lengths):
    """Candidates whose text is their index and whose token_ids have the given lengths."""
    return [Candidate(pid, i, f"c{i}", list(range(n)), "stop") for i, n in enumerate(lengths)]


def _select(scores, cfg=None, lengths=None, seed=0):
    prompts = _prompts(len(scores))
    cands = [_cands(p.id, lengths[i] if lengths else [1] * len(s)) for i, (p, s) in enumerate(zip(prompts, scores))]
    return select_pairs(prompts, cands, scores, cfg or PairsConfig(), seed=seed)


def _idx(pairs):
    return [(p["prompt_id"], p["chosen_index"], p["rejected_index"]) for p in pairs]


def _funnel_adds_up(funnel):
    assert funnel.candidates == funnel.judged + funnel.judge_errors
    assert funnel.prompts == funnel.prompts_paired + sum(funnel.dropped.values())


def test_best_vs_worst_default_picks_first_max_and_first_min():
    pairs, funnel = _select([[0.2, 0.9, 0.1, 0.9, 0.1], [3.0, 1.0, 2.0]])
    assert _idx(pairs) == [("p0", 1, 2), ("p1", 0, 1)]
    first = pairs[0]
    assert first["chosen"] == [{"role": "assistant", "content": "c1"}]
    assert first["rejected"] == [{"role": "assistant", "content": "c2"}]
    assert first["prompt"] == [{"role": "user", "content": "q0"}]
    assert first["margin"] == pytest.approx(0.8)
    assert [(p["tie"], p["chosen_prob"], p["replay_from_round"]) for p in pairs] == [(False, 1.0, None)] * 2
    assert funnel.pairs == funnel.prompts_paired == 2 and not funnel.dropped
    _funnel_adds_up(funnel)


def test_default_selection_matches_the_original_best_vs_worst_rule():
    """The default config must pick exactly what the first release picked (campaigns are
    compared across runs): the first max vs the first min, dropped when the margin <= 0."""
    rng = random.Random(0)
    scores = [[rng.choice([None, 0.0, 0.5, 1.0, rng.random()]) for _ in range(rng.randint(1, 6))] for _ in range(300)]
    pairs, _ = _select(scores)
    expected = []
    for i, s in enumerate(scores):
        usable = [(v, k) for k, v in enumerate(s) if v is not None]
        if len(usable) < 2:
            continue
        best, worst = max(usable, key=lambda t: t[0]), min(usable, key=lambda t: t[0])
        if best[0] - worst[0] > 0.0:
            expected.append((f"p{i}", best[1], worst[1]))
    assert _idx(pairs) == expected and len(expected) > 50


def test_best_vs_worst_on_task_prompts_drops_ties_and_errors_with_reasons():
    """Moved from test_data_and_pairs.py: the original behaviour on the built-in arithmetic task."""
    prompts = load_prompts(DataConfig()).train[:3]
    cands = [[Candidate(p.id, i, t, [i], "stop") for i, t in enumerate(["x", "y", "z"])] for p in prompts]
    scores = [[0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [None, None, 1.0]]
    pairs, funnel = select_pairs(prompts, cands, scores, PairsConfig())
    assert len(pairs) == 1
    assert pairs[0]["chosen"][0]["content"] == "y" and pairs[0]["rejected"][0]["content"] == "x"
    assert pairs[0]["margin"] == 1.0 and pairs[0]["prompt"] == prompts[0].messages
    f = funnel.as_dict()
    assert f["prompts"] == 3 and f["candidates"] == 9 and f["judged"] == 7 and f["judge_errors"] == 2
    assert f["dropped"] == {"tie (margin <= min_margin)": 1, "fewer than 2 judged candidates": 1}

def test_min_margin_drops_small_gaps_as_ties():
    cfg = PairsConfig(min_margin=0.5)
    pairs, funnel = _select([[0.0, 0.4], [0.0, 0.5], [0.0, 0.6]], cfg)
    assert _idx(pairs) == [("p2", 1, 0)]  # a margin equal to min_margin is a tie
    assert funnel.dropped == {TIE: 2}
    _funnel_adds_up(funnel)


def test_judge_errors_are_counted_and_never_win_or_lose():
    nan = float("nan")
    pairs, funnel = _select([[None, 0.3, 0.7, None], [None, None, 1.0], [nan, 0.2, 0.1], [None, None]])
    # None/NaN neither chosen nor rejected: p0 pairs the two judged ones, p2 ignores the NaN.
    assert _idx(pairs) == [("p0", 2, 1), ("p2", 1, 2)]
    f = funnel.as_dict()
    assert (f["prompts"], f["candidates"], f["judged"], f["judge_errors"]) == (4, 12, 5, 7)
    assert f["dropped"] == {TOO_FEW_JUDGED: 2}
    _funnel_adds_up(funnel)


def test_ties_kept_get_chosen_prob_one_half_on_two_distinct_candidates():
    scores = [[1.0, 1.0, 1.0], [0.0, 1.0]]
    dropped, f_drop = _select(scores)
    assert _idx(dropped) == [("p1", 1, 0)] and f_drop.dropped == {TIE: 1}

    kept, f_keep = _select(scores, PairsConfig(drop_ties=False))
    assert _idx(kept) == [("p0", 0, 1), ("p1", 1, 0)]
    assert [(p["tie"], p["chosen_prob"]) for p in kept] == [(True, 0.5), (False, 1.0)]
    assert f_keep.ties_kept == 1 and f_keep.pairs == 2 and not f_keep.dropped
    _funnel_adds_up(f_keep)


def test_kept_tie_under_a_margin_pairs_best_with_worst():
    pairs, _ = _select([[0.3, 0.5, 0.1]], PairsConfig(min_margin=1.0, drop_ties=False))
    assert _idx(pairs) == [("p0", 1, 2)] and pairs[0]["tie"] and pairs[0]["margin"] == pytest.approx(0.4)


def test_length_aware_chooses_shortest_near_best_and_rejects_longest_near_worst():
    cfg = PairsConfig(length_aware=True, length_tolerance=0.1)
    #        scores:  best-ish     best-ish    middle  worst-ish   worst-ish
    scores = [[1.0, 0.95, 0.5, 0.0, 0.05]]
    lengths = [[30, 10, 5, 8, 20]]
    pairs, _ = _select(scores, cfg, lengths)
    assert _idx(pairs) == [("p0", 1, 4)]  # the middle candidate is shortest overall but not near-best
    assert pairs[0]["margin"] == pytest.approx(0.9)

    plain, _ = _select(scores, PairsConfig(), lengths)
    assert _idx(plain) == [("p0", 0, 3)]


def test_length_aware_breaks_equal_lengths_by_index():
    cfg = PairsConfig(length_aware=True, length_tolerance=0.0)
    pairs, _ = _select([[0.0, 1.0, 1.0, 0.0, 1.0, 0.0]], cfg, [[7, 4, 4, 9, 6, 9]])
    assert _idx(pairs) == [("p0", 1, 3)]


def test_length_aware_never_turns_a_preference_into_a_tie():
    # Tolerance wider than the spread: every candidate is both near-best and near-worst.
    # The pair must still clear min_margin, so it falls back towards the real best/worst.
    # Unconstrained, the shortest (index 3, the worst) would be "chosen" against the longest.
    cfg = PairsConfig(length_aware=True, length_tolerance=1.0, min_margin=0.3)
    pairs, funnel = _select([[1.0, 0.9, 0.7, 0.5]], cfg, [[9, 2, 3, 1]])
    assert len(pairs) == 1 and not funnel.dropped
    p = pairs[0]
    assert p["margin"] == pytest.approx(0.4) and not p["tie"]
    # The shortest candidate clearing the margin against the worst, vs the longest it beats by it.
    assert (p["chosen_index"], p["rejected_index"]) == (1, 3)


def test_length_aware_kept_tie_pairs_shortest_with_longest_other():
    cfg = PairsConfig(length_aware=True, length_tolerance=0.25, min_margin=0.5, drop_ties=False)
    pairs, _ = _select([[0.4, 0.5, 0.3]], cfg, [[9, 5, 2]])
    assert _idx(pairs) == [("p0", 2, 0)] and pairs[0]["chosen_prob"] == 0.5


def test_length_aware_rejects_other_strategies_with_a_fix():
    with pytest.raises(ValueError, match="length_aware applies to strategy=best_vs_worst"):
        _select([[0.0, 1.0]], PairsConfig(strategy="random", length_aware=True))


def test_bad_settings_are_clear():
    with pytest.raises(ValueError, match="unknown pair strategy"):
        _select([[0.0, 1.0]], PairsConfig(strategy="everything"))
    with pytest.raises(ValueError, match="min_margin must be >= 0"):
        _select([[0.0, 1.0]], PairsConfig(min_margin=-0.1))
    with pytest.raises(ValueError, match="2 candidates but 1 scores"):
        select_pairs(_prompts(1), [_cands("p0", [1, 1])], [[1.0]], PairsConfig())


def test_random_strategy_is_seeded_valid_and_varies_across_seeds():
    cfg = PairsConfig(strategy="random", min_margin=0.15)
    scores = [[0.0, 0.1, 0.5, 0.9, 1.0, 0.3] for _ in range(20)]
    first, funnel = _select(scores, cfg, seed=11)
    again, _ = _select(scores, cfg, seed=11)
    assert _idx(first) == _idx(again) and len(first) == 20
    for p in first:  # always a real preference that clears the margin
        assert p["margin"] > 0.15 and p["score_chosen"] > p["score_rejected"] and not p["tie"]
    others = {tuple(_idx(_select(scores, cfg, seed=s)[0])) for s in range(5)}
    assert len(others) == 5
    # Prompts draw independently: with identical scores, they do not all get the same pair.
    assert len({(c, r) for _, c, r in _idx(first)}) > 1
    _funnel_adds_up(funnel)


def test_random_pick_does_not_depend_on_the_other_prompts():
    cfg = PairsConfig(strategy="random")
    scores = [[0.0, 0.2, 0.4, 0.6, 0.8]] * 6
    full, _ = _select(scores, cfg, seed=3)
    prompts = _prompts(6)[3:]
    part, _ = select_pairs(prompts, [_cands(p.id, [1] * 5) for p in prompts], scores[3:], cfg, seed=3)
    assert _idx(part) == _idx(full)[3:]


def test_random_strategy_ties_follow_drop_ties():
    scores = [[0.5, 0.5, 0.5]]
    assert _select(scores, PairsConfig(strategy="random"))[0] == []
    kept, _ = _select(scores, PairsConfig(strategy="random", drop_ties=False), seed=4)
    assert len(kept) == 1 and kept[0]["chosen_prob"] == 0.5
    assert kept[0]["chosen_index"] != kept[0]["rejected_index"]


def test_all_above_margin_orders_by_margin_then_index_and_caps():
    cfg = PairsConfig(strategy="all_above_margin", min_margin=0.2, max_pairs_per_prompt=4)
    scores = [[0.5, 1.0, 0.0, 1.0, 0.4]]
    pairs, funnel = _select(scores, cfg)
    # Clearing 0.2: (1,2) (3,2) 1.0; (1,4) (3,4) 0.6; (0,2) (1,0) (3,0) 0.5; (4,2) 0.4.
    assert [(p["chosen_index"], p["rejected_index"]) for p in pairs] == [(1, 2), (3, 2), (1, 4), (3, 4)]
    assert funnel.over_cap == 4 and funnel.pairs == 4 and funnel.prompts_paired == 1

    everything, f_all = _select(scores, PairsConfig(strategy="all_above_margin", min_margin=0.2,
                                                     max_pairs_per_prompt=100))
    got = [(p["chosen_index"], p["rejected_index"]) for p in everything]
    assert got == [(1, 2), (3, 2), (1, 4), (3, 4), (0, 2), (1, 0), (3, 0), (4, 2)]
    assert all(p["margin"] > 0.2 for p in everything) and f_all.over_cap == 0
    margins = [p["margin"] for p in everything]
    assert margins == sorted(margins, reverse=True)


def test_all_above_margin_ties_and_summary():
    cfg = PairsConfig(strategy="all_above_margin", min_margin=0.5, max_pairs_per_prompt=2, drop_ties=False)
    pairs, funnel = _select([[0.0, 1.0, 1.0], [0.2, 0.3], [None, 0.1], [0.0, 0.9, 0.8]], cfg)
    assert [p["tie"] for p in pairs] == [False, False, True, False, False]
    assert (funnel.pairs, funnel.ties_kept, funnel.prompts_paired, funnel.over_cap) == (5, 1, 3, 0)
    funnel.replayed = 3
    assert funnel.summary() == ("4 prompts -> 10 candidates -> 9 judged (1 judge errors) -> 5 pairs from 3 prompts "
                                "(1 ties kept, +3 replayed); dropped prompts: 1 fewer than 2 judged candidates")
    assert funnel.as_dict()["replayed"] == 3
    _funnel_adds_up(funnel)


def test_summary_lists_drops_largest_first():
    _, funnel = _select([[0.0, 0.0], [1.0, 1.0], [None, 1.0], [0.0, 1.0]])
    assert funnel.summary() == ("4 prompts -> 8 candidates -> 7 judged (1 judge errors) -> 1 pairs from 1 prompts; "
                                f"dropped prompts: 2 {TIE}, 1 {TOO_FEW_JUDGED}")


# ---- replay ----------------------------------------------------------------------------

def _round_pairs(r, n):
    return [{"prompt_id": f"r{r}p{i}", "chosen_index": 0, "rejected_index": 1, "replay_from_round": None}
            for i in range(n)]


@pytest.mark.parametrize("fraction,fresh,expected", [(0.0, 10, 0), (0.2, 12, 3), (0.25, 30, 10), (0.5, 7, 7),
                                                      (0.5, 0, 0), (0.1, 5, 1)])
def test_replay_count_makes_replayed_pairs_the_given_share(fraction, fresh, expected):
    assert replay_count(fresh, fraction) == expected
    earlier = [_round_pairs(0, 50), _round_pairs(1, 50)]
    replayed = replay_pairs(earlier, fresh, fraction, seed=1)
    assert len(replayed) == expected
    if fresh and expected:
        assert len(replayed) / (len(replayed) + fresh) == pytest.approx(fraction, abs=0.5 / (expected + fresh))


def test_replay_is_deterministic_distinct_tagged_and_only_from_earlier_rounds():
    earlier = [_round_pairs(0, 6), [], _round_pairs(2, 6)]
    current = _round_pairs(3, 12)
    a = replay_pairs(earlier, len(current), 0.4, seed=5)
    assert a == replay_pairs(earlier, len(current), 0.4, seed=5)
    assert len(a) == 8
    keys = [x["prompt_id"] for x in a]
    assert len(set(keys)) == len(keys)  # without replacement
    assert not set(keys) & {x["prompt_id"] for x in current}
    for x in a:  # tagged with the round the record came from
        assert x["prompt_id"].startswith(f"r{x['replay_from_round']}p") and x["replay_from_round"] in (0, 2)
    assert all(x["replay_from_round"] is None for r in earlier for x in r)  # inputs untouched
    draws = {tuple(x["prompt_id"] for x in replay_pairs(earlier, 12, 0.4, seed=s)) for s in range(6)}
    assert len(draws) > 1


def test_replay_is_capped_at_what_exists_and_skips_replayed_copies():
    earlier = [_round_pairs(0, 3), _round_pairs(1, 2) + [{**_round_pairs(0, 1)[0], "replay_from_round": 0}]]
    replayed = replay_pairs(earlier, fresh_count=100, fraction=0.5, seed=0)
    assert sorted(x["prompt_id"] for x in replayed) == ["r0p0", "r0p1", "r0p2", "r1p0", "r1p1"]
    assert replay_pairs([], 10, 0.5, seed=0) == []


def test_replay_rejects_a_fraction_of_one():
    with pytest.raises(ValueError, match=r"replay_fraction must be in \[0, 1\)"):
        replay_pairs([_round_pairs(0, 3)], 10, 1.0, seed=0)


def test_mixed_fresh_and_replayed_pairs_keep_one_dataset_schema():
    from datasets import Dataset

    fresh, _ = _select([[0.0, 1.0], [1.0, 0.0]])
    replayed = replay_pairs([fresh], len(fresh), 0.5, seed=0)
    ds = Dataset.from_list(fresh + replayed)
    assert ds["replay_from_round"] == [None, None, 0, 0]
    assert ds["chosen_prob"] == [1.0] * 4


# --- DivPO ----------------------------------------------------------------------------------

DIVPO_TEXTS = ["it is seven", "seven", "it is eight", "eight", "eight"]


def _divpo_select(scores, rho=0.1):
    prompts = _prompts(1)
    cands = [[Candidate("p0", i, t, [1] * (i + 1), "stop") for i, t in enumerate(DIVPO_TEXTS)]]
    return select_pairs(prompts, cands, [scores], PairsConfig(strategy="divpo", divpo_rho=rho))


def test_candidate_diversity_is_the_mean_ngram_distance_to_the_others():
    from online_dpo.diversity import distance_to_others

    # Similarities (mean Jaccard over n = 1..4, n skipped where both have none), by hand:
    # "it is seven"~"it is eight" = (2/4 + 1/3 + 0) / 3 = 5/18; "seven"~"it is seven" = (1/3 + 0 + 0) / 3 = 1/9;
    # "eight"~"it is eight" = 1/9; "eight"~"eight" = 1; every other pair shares no word: 0.
    expected = [(4 - 5 / 18 - 1 / 9) / 4, (4 - 1 / 9) / 4, (4 - 5 / 18 - 2 / 9) / 4, (3 - 1 / 9) / 4, (3 - 1 / 9) / 4]
    assert distance_to_others(DIVPO_TEXTS) == pytest.approx(expected)
    assert distance_to_others(["alone"]) == [0.0]


def test_divpo_chooses_the_most_diverse_right_answer_and_rejects_the_least_diverse_wrong_one():
    pairs, funnel = _divpo_select([1.0, 1.0, 0.0, 0.0, 0.0])
    # right: "it is seven" (65/72) vs "seven" (35/36) -> "seven"; wrong: "it is eight" (7/8) vs the two
    # "eight" (13/18 each; the earlier wins) -> index 3. best_vs_worst would take indices 0 and 2.
    assert _idx(pairs) == [("p0", 1, 3)] and funnel.pairs == 1
    assert _idx(_select([[1.0, 1.0, 0.0, 0.0, 0.0]])[0]) == [("p0", 0, 2)]


def test_divpo_bands_are_rho_times_the_score_range():
    scores = [0.9, 1.0, 0.0, 0.05, 0.5]  # band 0.1: near-best {0, 1}, near-worst {2, 3}; 0.5 in neither
    assert _idx(_divpo_select(scores, rho=0.1)[0]) == [("p0", 1, 3)]
    assert _idx(_divpo_select(scores, rho=0.0)[0]) == [("p0", 1, 2)]  # rho 0: best vs worst
    # range 0.8, band 0.36: near-best {1, 2 (0.7)}, near-worst {0 (0.2)}; the two 0.6s are in neither
    assert _idx(_divpo_select([0.2, 1.0, 0.7, 0.6, 0.6], rho=0.45)[0]) == [("p0", 1, 0)]


def test_divpo_ties_and_bad_rho():
    pairs, funnel = _divpo_select([1.0] * 5)
    assert pairs == [] and funnel.dropped[TIE] == 1
    from online_dpo.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="divpo_rho must be in"):
        load_config(None, ["pairs.strategy=divpo", "pairs.divpo_rho=0.5"])
