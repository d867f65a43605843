"""The reward-model scorer on a real (small, randomly initialised) sequence-classification
folder: no hub here, so the test builds one with the embedded model's tokenizer."""

import pytest

from judges import PairwiseItem, PointwiseItem, as_pairwise, load_judge


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory, embedded_model_path):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(embedded_model_path)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tok.eos_token_id)
    folder = tmp_path_factory.mktemp("rm")
    LlamaForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def test_reward_model_scores_are_batch_independent_floats(tiny_rm):
    items = [PointwiseItem("What is 2+2?", r) for r in ["4", "It is four, surely.", "5"]]
    one_batch = load_judge("reward_model", model=tiny_rm, batch_size=8).score(items)
    singles = load_judge("reward_model", model=tiny_rm, batch_size=1).score(items)
    assert all(s.error is None and isinstance(s.value, float) for s in one_batch)
    assert [s.value for s in one_batch] == pytest.approx([s.value for s in singles], abs=1e-4)  # padding-safe
    assert len({round(s.value, 6) for s in one_batch}) == 3  # distinct responses, distinct rewards
    v = as_pairwise(load_judge("reward_model", model=tiny_rm)).compare([PairwiseItem("q", "4", "5")])
    expected = "a" if one_batch[0].value > one_batch[2].value else "b"
    assert v[0].winner in (expected, "tie") and v[0].error is None


def test_reward_model_must_have_one_output(tmp_path, embedded_model_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(embedded_model_path)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=1, num_key_value_heads=1, num_labels=3)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="exactly 1"):
        load_judge("reward_model", model=str(tmp_path))
