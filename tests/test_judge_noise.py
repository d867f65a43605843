"""Judge noise: the judge of known quality, the separation test that keeps its noise out of the
pairs, the judge-quality summary of a round, and the stop on a judge that separates nothing."""

from __future__ import annotations

import random
import re

import pytest

from judges import PairwiseItem, Verdict, as_judge, load_judge
from judges.noisy import NoiseModel
from judges.ranking import round_robin_games, separation_pvalue, smallest_separation_pvalue
from online_dpo.config import PairsConfig
from online_dpo.data.prompts import Prompt
from online_dpo.errors import JudgeUnusableError
from online_dpo.judge_quality import agreement, flip_rate_bound, judge_quality, quality_warnings, separation_pvalues
from online_dpo.pairs import UNSEPARATED, Candidate, select_pairs
from online_dpo.separation import (
    SEPARATION_LEVEL,
    explain_level,
    explain_separation_alpha,
    reported_separation_level,
    separation_level,
)
from online_dpo.stages.judge import check_usable

K = 8


def arithmetic_items(n: int, right_a: bool, right_b: bool) -> list[PairwiseItem]:
    """n comparisons of two answers to 'a+b' whose rightness is given; every text distinct."""
    items = []
    for k in range(n):
        a, b = k % 10, k // 10
        answer = lambda right, tag: f"[{tag}{k}] {a + b if right else a + b + 1}"  # noqa: E731 - the last number counts
        items.append(PairwiseItem(f"What is {a} + {b}? #{k}", answer(right_a, "x"), answer(right_b, "y"), str(a + b)))
    return items


def test_noisy_judge_flips_decisive_verdicts_and_follows_position_on_ties_at_the_rates_set():
    judge = load_judge("noisy", truth="arithmetic", flip_rate=0.2, position_bias=0.6, both_orders=False)
    n = 4000
    decisive = judge.compare(arithmetic_items(n, True, False))  # A is right
    assert all("truth: a" in v.raw for v in decisive)
    assert 0.77 < sum(v.winner == "a" for v in decisive) / n < 0.83  # right 1 - ε of the time
    ties = judge.compare(arithmetic_items(n, False, False))  # both wrong: a tie in truth
    assert all("truth: tie" in v.raw for v in ties)
    assert 0.57 < sum(v.winner == "a" for v in ties) / n < 0.63  # the first-shown response, p of the time
    assert judge.stats.requests == 2 * n


def test_noisy_judge_in_both_orders_is_position_inconsistent_as_an_llm_judge_is():
    # ε = 0.15, p = 0.7: decisive truth agrees in both orders (1-ε)² + ε² = 74.5% of the time;
    # tie truth 2 p (1-p) = 42% (both orders name the same response only when the bias misses once).
    judge = load_judge("noisy", truth="arithmetic", flip_rate=0.15, position_bias=0.7)
    n = 4000
    decisive = judge.compare(arithmetic_items(n, False, True))
    consistent = [v for v in decisive if v.position_consistent]
    assert 0.72 < len(consistent) / n < 0.77
    assert all(v.winner == "tie" for v in decisive if not v.position_consistent)
    assert 0.85 < sum(v.winner == "b" for v in consistent) / len(consistent) < 0.98  # (1-ε)² / ((1-ε)² + ε²) = 0.97
    ties = judge.compare(arithmetic_items(n, True, True))
    assert 0.39 < sum(v.position_consistent for v in ties) / n < 0.45
    assert judge.stats.consistent + judge.stats.inconsistent == 2 * n


def test_noisy_judge_answers_a_request_the_same_every_time_and_passes_errors_through():
    items = arithmetic_items(50, True, False) + arithmetic_items(50, False, False)
    first = load_judge("noisy", flip_rate=0.3, position_bias=0.7, seed=3).compare(items)
    again = load_judge("noisy", flip_rate=0.3, position_bias=0.7, seed=3).compare(items)
    other_seed = load_judge("noisy", flip_rate=0.3, position_bias=0.7, seed=4).compare(items)
    assert [v.winner for v in first] == [v.winner for v in again]
    assert [v.winner for v in first] != [v.winner for v in other_seed]
    no_reference = load_judge("noisy").compare([PairwiseItem("What is 1+1?", "2", "3", None)])
    assert no_reference[0].error and no_reference[0].winner is None  # the verifier's error, not a coin flip


def test_noise_model_rejects_a_rate_outside_zero_one():
    with pytest.raises(ValueError, match="flip_rate"):
        NoiseModel(flip_rate=1.5)


def simulated_round_robin(rng: random.Random, right: list[bool], eps: float = 0.15, bias: float = 0.7):
    """The outcomes of a both-orders round robin among candidates of the given rightness."""
    def ask(first_right: bool, second_right: bool) -> str:
        if first_right != second_right:
            better = "first" if first_right else "second"
            return better if rng.random() >= eps else {"first": "second", "second": "first"}[better]
        return "first" if rng.random() < bias else "second"

    games = round_robin_games(len(right))
    outcomes = []
    for i, j in games:
        ab = "i" if ask(right[i], right[j]) == "first" else "j"
        ba = "j" if ask(right[j], right[i]) == "first" else "i"
        outcomes.append(0.5 if ab != ba else 1.0 if ab == "i" else 0.0)
    return games, outcomes


def test_separation_test_is_calibrated_when_all_candidates_are_equal_and_finds_mixed_ones():
    rng = random.Random(0)
    trials = 300
    equal = [separation_pvalue(K, *simulated_round_robin(rng, [False] * K), seed=t, draws=500) for t in range(trials)]
    half = [separation_pvalue(K, *simulated_round_robin(rng, [True] * 4 + [False] * 4), seed=t, draws=500)
            for t in range(trials)]
    false_alarms = sum(p <= 0.1 for p in equal) / trials
    found = sum(p <= 0.1 for p in half) / trials
    assert false_alarms <= 0.1 + 0.05  # at most alpha, up to sampling error
    assert found >= 0.8


def test_separation_pvalue_edge_cases_and_seed():
    games = round_robin_games(4)
    assert separation_pvalue(4, games, [0.5] * len(games), seed=0) == 1.0  # all ties: nothing to test
    assert separation_pvalue(4, [], [], seed=0) == 1.0
    best_beats_all = [1.0 if i == 0 else 0.5 for i, _ in games]
    assert separation_pvalue(4, games, best_beats_all, seed=1) == separation_pvalue(4, games, best_beats_all, seed=1)


def candidates_for(prompt_id: str, n: int) -> list[Candidate]:
    return [Candidate(prompt_id, i, f"answer {i}", [i + 1], "stop") for i in range(n)]


def test_an_unseparated_prompt_keeps_its_pair_without_the_nll_term_or_is_dropped_as_set():
    prompts = [Prompt(f"p{k}", [{"role": "user", "content": f"q{k}"}]) for k in range(3)]
    cands = [candidates_for(p.id, K) for p in prompts]
    scores = [[1.0, 0.5] + [0.0] * (K - 2)] * 3
    separation = [0.01, 0.5, None]  # p2: a scorer's scores, never tested
    for cfg in (PairsConfig(), PairsConfig(unseparated="no_nll")):
        pairs, funnel = select_pairs(prompts, cands, scores, cfg, separation=separation, separation_level=0.2)
        assert [(p["prompt_id"], p["chosen_nll_weight"]) for p in pairs] == [("p0", 1.0), ("p1", 0.0), ("p2", 1.0)]
        assert funnel.without_nll == 1 and not funnel.dropped and "1 unseparated, without NLL" in funnel.summary()
    pairs, funnel = select_pairs(prompts, cands, scores, PairsConfig(unseparated="drop"), separation=separation,
                                 separation_level=0.2)
    assert [p["prompt_id"] for p in pairs] == ["p0", "p2"] and funnel.dropped == {UNSEPARATED: 1}
    for cfg in (PairsConfig(), PairsConfig(unseparated="drop")):  # level 1.0: the test is off
        everything, funnel = select_pairs(prompts, cands, scores, cfg, separation=separation, separation_level=1.0)
        assert [p["chosen_nll_weight"] for p in everything] == [1.0] * 3 and funnel.without_nll == 0


def reference_agreement(rng: random.Random, eps: float, prompts: int = 24) -> dict:
    """`agreement` of a simulated round: `prompts` round robins over three right and five wrong
    candidates, each game asked in both orders, decisive verdicts flipped with probability eps."""
    rows, correct = [], {}
    right = [True] * 3 + [False] * 5
    for k in range(prompts):
        rows += games_rows(f"p{k}", *simulated_round_robin(rng, right, eps=eps))
        correct.update({(f"p{k}", i): float(r) for i, r in enumerate(right)})
    return agreement(rows, correct)


def test_auto_tests_separation_unless_the_references_show_the_judge_nearly_exact():
    rng = random.Random(11)
    exact, noisy = reference_agreement(rng, eps=0.0), reference_agreement(rng, eps=0.15)
    assert exact["flip_rate"] == 0.0 and flip_rate_bound(exact) < 0.05 < flip_rate_bound(noisy)
    auto = PairsConfig()
    assert separation_level(auto, K, flip_rate_bound(exact)) == 1.0  # an exact judge's rankings are clean
    assert separation_level(auto, K, flip_rate_bound(noisy)) == SEPARATION_LEVEL
    assert separation_level(auto, K, None) == SEPARATION_LEVEL  # no references: not shown exact
    few = reference_agreement(rng, eps=0.0, prompts=1)  # 15 decisive comparisons, all right: too few to show it
    assert few["flip_rate"] == 0.0 and separation_level(auto, K, flip_rate_bound(few)) == SEPARATION_LEVEL
    assert separation_level(auto, 4, None) == 1.0  # no ranking of 4 candidates reaches the level
    for set_by_hand in (0.1, 1.0):  # a number is that level, whatever the judge
        assert separation_level(PairsConfig(separation_alpha=set_by_hand), K, flip_rate_bound(exact)) == set_by_hand
        assert separation_level(PairsConfig(separation_alpha=set_by_hand), K, None) == set_by_hand
    assert flip_rate_bound(None) is None and flip_rate_bound({"decisive": 0}) is None

    line = explain_level(auto, 1.0, flip_rate_bound(exact), exact)
    assert line.startswith("pairs.separation_alpha=auto -> off") and "flip rate was 0%" in line
    assert f"on the {exact['decisive']} comparisons" in line and "nearly exact" in line
    line = explain_level(auto, 0.2, flip_rate_bound(noisy), noisy)
    assert line.startswith("pairs.separation_alpha=auto -> 0.2") and "not shown below 5%" in line
    assert "no reference answers" in explain_level(auto, 0.2, None, None)
    assert "no comparison the reference answers decide" in explain_level(auto, 0.2, None, {"decisive": 0})
    assert explain_level(PairsConfig(separation_alpha=0.2), 0.2, None, None) == ""  # set by hand: said at the start
    assert explain_level(auto, 1.0, None, None) == ""  # off for too few candidates: said at the start too


def test_the_round_chooses_its_level_from_its_own_verdicts_against_the_reference_answers():
    # The select stage's decision, on a round's saved verdicts: candidates whose texts the
    # arithmetic check marks right or wrong, judged by a simulated both-orders judge.
    from types import SimpleNamespace

    from online_dpo.config import CampaignConfig
    from online_dpo.objectives import build_objective
    from online_dpo.stages.select import round_separation_level

    cfg = CampaignConfig()
    campaign = SimpleNamespace(cfg=cfg, objective=build_objective(cfg))
    right = [True] * 3 + [False] * 5
    prompts = [Prompt(f"p{k}", [{"role": "user", "content": f"What is {k} + 1?"}], reference=str(k + 1))
               for k in range(24)]
    candidates = [[Candidate(p.id, i, f"The answer is {k + 1 if ok else k + 2}", [i + 1], "stop")
                   for i, ok in enumerate(right)] for k, p in enumerate(prompts)]
    for eps, level in ((0.0, 1.0), (0.15, SEPARATION_LEVEL)):
        rng = random.Random(3)
        games = [row for p in prompts for row in games_rows(p.id, *simulated_round_robin(rng, right, eps=eps))]
        chosen, reference = round_separation_level(campaign, prompts, candidates, games)
        assert chosen == level and reference["decisive"] == 24 * 15
    unreferenced = [Prompt(p.id, p.messages) for p in prompts]  # a task without reference answers
    assert round_separation_level(campaign, unreferenced, candidates, games) == (SEPARATION_LEVEL, None)
    assert round_separation_level(campaign, prompts, candidates, []) == (1.0, None)  # no round robins: a scorer
    kto = CampaignConfig()
    kto.dpo.loss = "kto"  # labels each response by its own score: nothing for the test to act on
    kto_campaign = SimpleNamespace(cfg=kto, objective=build_objective(kto))
    assert round_separation_level(kto_campaign, prompts, candidates, games) == (1.0, None)


def test_the_log_says_what_the_separation_setting_does_and_warns_where_it_catches_everything():
    # With 3 candidates even a perfectly consistent round robin has p = 0.75: a level set by hand
    # below it catches every prompt, and the log warns with the fix.
    prompts = [Prompt("p0", [{"role": "user", "content": "q"}])]
    three = [candidates_for("p0", 3)]
    dropping = PairsConfig(separation_alpha=0.1, unseparated="drop")
    dropped, funnel = select_pairs(prompts, three, [[1.0, 0.5, 0.0]], dropping, separation=[0.75],
                                   separation_level=separation_level(dropping, 3, None))
    assert dropped == [] and funnel.dropped == {UNSEPARATED: 1}
    line, warn = explain_separation_alpha(dropping, pairwise_judge=True, samples_per_prompt=3)
    assert warn and "drops every prompt" in line and "p >= 0.75" in line
    line, warn = explain_separation_alpha(PairsConfig(separation_alpha=0.1), pairwise_judge=True, samples_per_prompt=3)
    assert warn and "catches every prompt" in line and "without the chosen response's NLL term" in line
    line, warn = explain_separation_alpha(PairsConfig(), pairwise_judge=True, samples_per_prompt=8)
    assert not warn and "auto: each round" in line and "(p > 0.2) gives its pair without" in line
    assert "nearly exact against the reference answers" in line
    line, warn = explain_separation_alpha(PairsConfig(), pairwise_judge=True, samples_per_prompt=4)
    assert not warn and "auto -> off: with 4 candidates" in line
    line, warn = explain_separation_alpha(PairsConfig(separation_alpha=0.2), pairwise_judge=True, samples_per_prompt=8)
    assert not warn and "without the chosen response's NLL term (pairs.unseparated=no_nll)" in line
    line, warn = explain_separation_alpha(dropping, pairwise_judge=True, samples_per_prompt=8)
    assert not warn and "beyond chance gives no pair" in line
    line, warn = explain_separation_alpha(PairsConfig(separation_alpha=1.0), pairwise_judge=True, samples_per_prompt=8)
    assert not warn and ": off" in line
    line, _ = explain_separation_alpha(PairsConfig(), pairwise_judge=False, samples_per_prompt=8)
    assert "not applied" in line
    assert smallest_separation_pvalue(8) < 0.001 < smallest_separation_pvalue(5)
    assert reported_separation_level(1.0, 8) == SEPARATION_LEVEL  # reported though not applied
    assert reported_separation_level(1.0, 4) is None  # no ranking of 4 can reach it
    assert reported_separation_level(0.05, 8) == 0.05


def games_rows(prompt_id: str, games, outcomes) -> list[dict]:
    winner = {1.0: "a", 0.0: "b", 0.5: "tie"}
    return [{"prompt_id": prompt_id, "i": i, "j": j, "winner": winner[o], "error": None,
             "position_consistent": o != 0.5, "prob_a": None} for (i, j), o in zip(games, outcomes)]


def test_judge_quality_measures_the_flip_rate_against_references():
    rng = random.Random(5)
    right = [True] * 3 + [False] * 5
    rows, correct = [], {}
    prompts = [Prompt(f"p{k}", [{"role": "user", "content": f"q{k}"}], reference="1") for k in range(60)]
    for p in prompts:
        rows += games_rows(p.id, *simulated_round_robin(rng, right, eps=0.15))
        correct.update({(p.id, i): float(r) for i, r in enumerate(right)})
    q = judge_quality(rows, correct, separated=40, tested=60)
    ref = q["vs_reference"]
    assert ref["decisive"] == 60 * 15
    assert 0.12 < ref["flip_rate"] < 0.18  # ε = 0.15 per request
    assert ref["interval"][0] > 0.8 and quality_warnings(q, 0.1) == []
    p_values = separation_pvalues(prompts, [candidates_for(p.id, K) for p in prompts], rows, seed=0)
    assert sum(p <= 0.1 for p in p_values) > 40  # three right among eight: mostly separated


def test_judge_quality_warns_about_a_judge_no_better_than_a_coin():
    rng = random.Random(2)
    right = [True] * 4 + [False] * 4
    rows, correct = [], {}
    for k in range(10):
        rows += games_rows(f"p{k}", *simulated_round_robin(rng, right, eps=0.5, bias=0.5))
        correct.update({(f"p{k}", i): float(r) for i, r in enumerate(right)})
    warnings = quality_warnings(judge_quality(rows, correct, separated=1, tested=10), 0.1)
    assert len(warnings) == 2
    assert "no better than a coin" in warnings[0] and "no more than chance" in warnings[1]


def test_a_round_of_only_ties_or_only_errors_stops_before_anything_is_saved():
    tie = {"prompt_id": "p0", "i": 0, "j": 1, "winner": "tie", "error": None}
    failed = {"prompt_id": "p0", "i": 0, "j": 2, "winner": None, "error": "timeout"}
    scored = [{"prompt_id": "p0", "index": 0, "score": 0.5, "error": None}]
    with pytest.raises(JudgeUnusableError, match="round 3 judge: all 2 comparisons were ties \\(1\\) or errors \\(1\\)"):
        check_usable(3, scored, [tie, failed])
    with pytest.raises(JudgeUnusableError, match="all 1 candidates got a judge error \\(the first: boom\\).*resume"):
        check_usable(0, [{"prompt_id": "p0", "index": 0, "score": None, "error": "boom"}], [])
    check_usable(0, scored, [tie, {**tie, "winner": "a"}])  # one decisive verdict is enough
    # Asked in both orders only where they decide (judge.second_order=deciding), a judge that
    # follows the position looks decisive in its games asked once; both orders show what it is.
    once, twice = {**tie, "winner": "a", "position_consistent": None}, {**tie, "position_consistent": False}
    with pytest.raises(JudgeUnusableError, match="all 1 comparisons asked in both orders were ties \\(1\\)"):
        check_usable(1, scored, [once, once, twice])
    check_usable(1, scored, [once, twice, {**twice, "winner": "b", "position_consistent": True}])


def test_identical_responses_tie_without_a_judge_call():
    from judges.base import IDENTICAL, compare_distinct

    judge = load_judge("noisy", flip_rate=0.0, position_bias=1.0)
    items = [PairwiseItem("What is 1+1?", "2", "2", "2"), PairwiseItem("What is 1+1?", "3", "2", "2")]
    verdicts = compare_distinct(judge, items)
    assert [(v.winner, v.raw) for v in verdicts][0] == ("tie", IDENTICAL)
    assert verdicts[1].winner == "b"
    assert judge.stats.requests == 2  # the distinct pair only, in both orders


def test_a_judge_that_only_follows_the_position_ranks_nothing_even_asked_in_one_order():
    from judges.ranking import CandidateGroup, score_groups

    class AlwaysFirst:
        def compare(self, items):
            return [Verdict("a") for _ in items]

    groups = [CandidateGroup("What is 2+2?", [f"answer {k}" for k in range(K)], "4")]
    scores, verdicts = score_groups(as_judge(AlwaysFirst()), groups)
    shares = [s.value for s in scores[0]]
    assert max(shares) - min(shares) <= 1 / 7 + 1e-9  # each candidate was shown first in 3 or 4 of its 7 games
    outcomes = [{"a": 1.0, "b": 0.0, "tie": 0.5}[v.winner] for v in verdicts]
    assert separation_pvalue(K, round_robin_games(K), outcomes, seed=0) > 0.5


def mixed_groups(prompts: int, seed: int) -> tuple[list, list[list[bool]]]:
    """Groups of K arithmetic answers, each right with a probability drawn per prompt; texts distinct."""
    from judges.ranking import CandidateGroup

    rng = random.Random(seed)
    groups, rights = [], []
    for n in range(prompts):
        a, b, q = n % 10, n // 10, rng.random()
        right = [rng.random() < q for _ in range(K)]
        answers = [f"[{k}] {a + b if r else a + b + 1 + k}" for k, r in enumerate(right)]
        groups.append(CandidateGroup(f"What is {a} + {b}? #{n}", answers, str(a + b)))
        rights.append(right)
    return groups, rights


def best_and_worst(scores) -> tuple[int, int]:
    """best_vs_worst's pick from one group's scores (the earliest of equal scores)."""
    values = [s.value for s in scores]
    return values.index(max(values)), values.index(min(values))


def test_deciding_games_ask_the_second_order_of_every_game_of_the_best_and_worst_and_of_fewer_others():
    from judges.ranking import score_groups

    groups, rights = mixed_groups(200, seed=1)
    every = load_judge("noisy", flip_rate=0.15, position_bias=0.7, seed=3)
    deciding = load_judge("noisy", flip_rate=0.15, position_bias=0.7, seed=3)
    scores_all, _ = score_groups(every, groups, "all")
    scores_deciding, verdicts = score_groups(deciding, groups, "deciding")
    assert every.stats.requests == 200 * 28 * 2  # every text distinct: both orders of every game
    assert deciding.stats.requests < 0.95 * every.stats.requests
    both = [v.position_consistent is not None for v in verdicts]
    assert deciding.stats.requests == sum(both) + len(verdicts)  # once each, twice the settled ones
    assert deciding.stats.consistent + deciding.stats.inconsistent == sum(both)
    games = round_robin_games(K)
    for g, scores in enumerate(scores_deciding):
        best, worst = best_and_worst(scores)
        for (i, j), asked_twice in zip(games, both[g * 28 : (g + 1) * 28]):
            if best in (i, j) or worst in (i, j):
                assert asked_twice, (g, i, j)  # the pair comes from games asked both ways only

    def right_pairs(all_scores) -> int:
        return sum(r[b] and not r[w] for r, (b, w) in zip(rights, map(best_and_worst, all_scores)))

    mixed = sum(any(r) and not all(r) for r in rights)
    # The same pairs as both orders of every game, within a few of the prompts that have a right pair to find.
    assert right_pairs(scores_deciding) >= right_pairs(scores_all) - 0.03 * mixed


def test_a_judge_that_cannot_ask_its_orders_apart_is_asked_its_own_way_and_the_band_widens_the_extremes():
    from judges.ranking import score_groups

    groups, _ = mixed_groups(20, seed=2)
    one_way = load_judge("noisy", flip_rate=0.15, position_bias=0.7, both_orders=False)
    _, verdicts = score_groups(one_way, groups, "deciding")
    assert one_way.stats.requests == 20 * 28 and all(v.position_consistent is None for v in verdicts)
    verifier = load_judge("arithmetic")
    assert score_groups(verifier, groups, "deciding")[0] == score_groups(verifier, groups, "all")[0]

    requests = []
    for band in (0.0, 0.15, 1.0):
        judge = load_judge("noisy", flip_rate=0.15, position_bias=0.7)
        score_groups(judge, groups, "deciding", band)
        requests.append(judge.stats.requests)
    assert requests[0] < requests[1] < requests[2] == 20 * 28 * 2  # a band over every score: every game, both ways


def test_llm_judge_orders_asked_apart_combine_as_both_orders_at_once():
    """OpenAI and vLLM judges share BothOrders: one order at a time, combined, gives the verdicts
    (and consistency counts) that asking both at once gives."""
    from judges.llm_judge import BothOrders, JudgeStats, Reply

    def ask(prompts, sha):
        """Names the response marked <<R>> where only one is, else the one shown first."""
        out = []
        for p in prompts:
            first, second = re.findall(r"<<([RW])>>", p)
            out.append(Reply("A" if first == second or first == "R" else "B"))
        return out

    items = [PairwiseItem("q", "1 <<R>>", "2 <<W>>"), PairwiseItem("q", "3 <<W>>", "4 <<R>>"),
             PairwiseItem("q", "5 <<R>>", "6 <<R>>")]  # the last: equally good, the first shown wins
    at_once = BothOrders(JudgeStats())
    apart = BothOrders(JudgeStats())
    together = at_once.compare(items, ask)
    shown = apart.compare(items, ask, both_orders=False)
    swapped = [PairwiseItem(it.prompt, it.response_b, it.response_a) for it in items]
    back = [v.swapped() for v in apart.compare(swapped, ask, both_orders=False)]
    combined = [apart.combine(a, b) for a, b in zip(shown, back)]
    assert [(v.winner, v.position_consistent) for v in together] == [("a", True), ("b", True), ("tie", False)]
    assert [(v.winner, v.position_consistent) for v in combined] == [(v.winner, v.position_consistent) for v in together]
    assert (apart.stats.consistent, apart.stats.inconsistent) == (at_once.stats.consistent, at_once.stats.inconsistent)


def test_second_order_deciding_applies_to_a_best_vs_worst_pair_from_a_judge_that_asks_its_orders_apart():
    from online_dpo.campaign import resolve_second_order
    from online_dpo.config import ConfigError, load_config

    def resolve(judge, *overrides):
        return resolve_second_order(load_config("configs/quickstart.yaml", list(overrides)), judge)

    noisy = load_judge("noisy")
    assert resolve(noisy) == ("all", None)  # the default: both orders of every game, nothing to say
    order, line = resolve(noisy, "judge.second_order=deciding")
    assert order == "deciding" and "the second order only of the games of each prompt's best and worst" in line
    for judge in (load_judge("noisy", both_orders=False), load_judge("arithmetic")):  # nothing to save
        order, line = resolve(judge, "judge.second_order=deciding")
        assert order == "all" and line.startswith("judge.second_order=deciding: not applied")
    with pytest.raises(ConfigError, match="judge.second_order=deciding .* pairs.strategy=random"):
        load_config("configs/quickstart.yaml", ["judge.second_order=deciding", "pairs.strategy=random"])


def test_the_report_shows_per_round_the_level_the_pairs_were_tested_at():
    from online_dpo.report.tables import JUDGE_COLUMNS, judge_rows
    from online_dpo.report.view import RoundView

    def judged(level):
        quality = judge_quality([{"prompt_id": "p", "i": 0, "j": 1, "winner": "a", "error": None,
                                  "position_consistent": True}], {("p", 0): 1.0, ("p", 1): 0.0},
                                separated=3, tested=4, separation_level=level)
        return {"judge_quality": quality}

    rounds = [RoundView(0, judged(1.0)), RoundView(1, judged(0.2)), RoundView(2, judged(None)), RoundView(3, {})]
    rows = judge_rows(rounds)
    at = JUDGE_COLUMNS.index("test at")
    assert [row[at] for row in rows] == ["off", "0.2", "-"]  # a scorer's round (no quality) has no row
    assert rows[0][JUDGE_COLUMNS.index("separated")] == "3/4"
    assert rows[0][JUDGE_COLUMNS.index("flip rate")] == "0.00"
