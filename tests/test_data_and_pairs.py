import pytest

from online_dpo.config import DataConfig
from online_dpo.data import DataError, load_prompts


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

