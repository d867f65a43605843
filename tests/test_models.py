import pytest

from judges.models import ModelError, resolve_model_path
from online_dpo.engines.models import load_tokenizer


def test_embedded_model_is_a_plain_safetensors_folder(embedded_model_path):
    from pathlib import Path

    folder = Path(embedded_model_path)
    assert (folder / "model.safetensors").exists() and (folder / "config.json").exists()
    tok = load_tokenizer(embedded_model_path)
    assert tok.chat_template and tok.eos_token_id is not None
    assert resolve_model_path("embedded") == embedded_model_path


def test_unreachable_hub_id_fails_with_a_clear_message():
    with pytest.raises(ModelError) as e:
        resolve_model_path("no-such-org/no-such-model-xyz")
    msg = str(e.value)
    assert "no-such-org/no-such-model-xyz" in msg and "local folder" in msg


def test_missing_local_folder(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="config.json"):
        resolve_model_path(str(tmp_path / "empty"))


def test_hf_backend_batches_prompts_of_different_lengths_reproducibly(embedded_model_path):
    """Left-padded batches: the sampled tokens' log-probs equal an unpadded teacher-forced pass,
    a repeated call samples the same tokens, and splitting into smaller batches keeps the
    per-prompt grouping (K samples per prompt, in prompt order)."""
    import torch

    from online_dpo.data import Prompt, chat_prompt_ids
    from online_dpo.engines.generate import HFGenerator, Sampling
    from online_dpo.engines.models import load_policy

    tokenizer, model = load_tokenizer(embedded_model_path), load_policy(embedded_model_path)
    prompts = [Prompt(id=str(i), messages=[{"role": "user", "content": f"Add {i} and {i + 3}." + " Please." * (3 * i)}])
               for i in range(3)]
    lengths = [len(chat_prompt_ids(tokenizer, p.messages)) for p in prompts]
    assert len(set(lengths)) == 3, "the prompts must differ in length so that the batch is padded"
    sampling = Sampling(n=2, temperature=1.0, top_p=1.0, max_new_tokens=6, seed=5, logprobs=True)

    whole = HFGenerator(model, tokenizer).generate(prompts, sampling)
    again = HFGenerator(model, tokenizer).generate(prompts, sampling)
    assert [[c.token_ids for c in cs] for cs in whole] == [[c.token_ids for c in cs] for cs in again]
    assert [len(cs) for cs in whole] == [2, 2, 2]

    with torch.no_grad():
        for prompt, cs in zip(prompts, whole):
            ids = chat_prompt_ids(tokenizer, prompt.messages)
            for c in cs:
                assert c.token_ids and len(c.logprobs) == len(c.token_ids)
                assert c.finish_reason == ("stop" if c.token_ids[-1] == tokenizer.eos_token_id else "length")
                logits = model(torch.tensor([ids + c.token_ids])).logits[0, len(ids) - 1:-1]
                forced = logits.log_softmax(-1).gather(1, torch.tensor(c.token_ids)[:, None]).squeeze(1)
                assert torch.allclose(forced, torch.tensor(c.logprobs), atol=1e-4)

    # One prompt per call (2 sequences): the same shape, each batch seeded by its position.
    split = HFGenerator(model, tokenizer, max_batch_sequences=2).generate(prompts, sampling)
    assert [len(cs) for cs in split] == [2, 2, 2]
    assert all(len(c.token_ids) <= 6 for cs in split for c in cs)


def test_auto_kv_cache_holds_the_largest_call_at_once_within_the_cap():
    from types import SimpleNamespace

    from online_dpo.engines.generate import kv_cache_bytes

    # SmolLM2-135M's shape: 30 layers, 3 KV heads of 64 -> 2*30*3*64*4 = 46,080 bytes per fp32 token
    shape = SimpleNamespace(num_hidden_layers=30, num_key_value_heads=3, num_attention_heads=9, hidden_size=576)
    per_block = 16 * 46_080
    # 64 sequences of <= 73 tokens: 5 blocks of 16 each
    assert kv_cache_bytes(shape, "float32", 73, 64) == 64 * 5 * per_block  # 0.22 GiB, not the old fixed 1 GiB
    assert kv_cache_bytes(shape, "bfloat16", 73, 64) == 64 * 5 * per_block // 2
    assert kv_cache_bytes(shape, "float32", 304, 512) == 2**30  # the quickstart's 512 candidates: capped
    assert kv_cache_bytes(shape, "float32", 73, 64, cap_gb=0.0) == 5 * per_block  # never below one sequence
