import pytest

from online_dpo.config import DataConfig, PairsConfig
from online_dpo.data import DataError, load_prompts
from online_dpo.pairs import Candidate, select_pairs


def test_arithmetic_split_is_seeded_disjoint_and_sliced_without_reuse():
    cfg = DataConfig(train_prompts_per_round=50, eval_prompts=100, seed=7)
    a, b = load_prompts(cfg), load_prompts(cfg)
    assert [p.id for p in a.train] == [p.id for p in b.train]
    assert {p.group for p in a.train}.isdisjoint({p.group for p in a.eval})
    assert len(a.eval) == 100
    r0, r1 = a.round_prompts(0, 50), a.round_prompts(1, 50)
    assert not {p.id for p in r0} & {p.id for p in r1}
    for p in r0:
        expr = p.group.replace("*", "*")
        assert str(eval(expr)) == p.reference
    with pytest.raises(DataError, match="train_prompts_per_round"):
        a.round_prompts(100, 50)


def test_bad_task_settings_are_clear():
    with pytest.raises(DataError, match="unknown data.source"):
        load_prompts(DataConfig(source="poetry"))
    with pytest.raises(DataError, match="data.ops"):
        load_prompts(DataConfig(ops=["^"]))


def _cands(pid, texts):
    return [Candidate(pid, i, t, [i], "stop") for i, t in enumerate(texts)]


def test_best_vs_worst_drops_ties_and_errors_with_reasons():
    cfg = load_prompts(DataConfig())
    prompts = cfg.train[:3]
    cands = [_cands(p.id, ["x", "y", "z"]) for p in prompts]
    scores = [[0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [None, None, 1.0]]
    pairs, funnel = select_pairs(prompts, cands, scores, PairsConfig())
    assert len(pairs) == 1
    assert pairs[0]["chosen"][0]["content"] == "y" and pairs[0]["rejected"][0]["content"] == "x"
    assert pairs[0]["margin"] == 1.0 and pairs[0]["prompt"] == prompts[0].messages
    f = funnel.as_dict()
    assert f["prompts"] == 3 and f["candidates"] == 9 and f["judged"] == 7 and f["judge_errors"] == 2
    assert f["dropped"] == {"tie (margin <= min_margin)": 1, "fewer than 2 judged candidates": 1}
