"""The update loop on a tiny random Llama (fast, no vLLM): every loss trains, and the
DPO objective moves the policy toward the chosen response."""

import pytest
import torch

from online_dpo import dpo
from online_dpo.config import DPOConfig


@pytest.fixture
def tiny_policy():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1)
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("loss,extra", [("sigmoid", {}), ("sigmoid", {"label_smoothing": 0.1}),
                                        ("robust", {"label_smoothing": 0.1}), ("ipo", {}), ("hinge", {}),
                                        ("sigmoid", {"rpo_alpha": 1.0})])
def test_every_loss_raises_the_chosen_margin(tiny_policy, loss, extra):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    cfg = DPOConfig(loss=loss, beta=0.5, learning_rate=1e-2, epochs=1, max_steps=8, batch_size=2,
                    mixed_precision="no", **extra)
    pairs = [([1, 2, 3], [10, 11, 12, 2], [20, 21, 2]), ([4, 5], [13, 14, 2], [22, 23, 24, 2])]
    batches = [dpo.collate_pairs([dpo.encode_pair(p, c, r, 32) for p, c, r in pairs], pad_id=0)]
    ref = dpo.reference_logps(tiny_policy, batches, accelerator)
    optimizer = torch.optim.AdamW(tiny_policy.parameters(), lr=cfg.learning_rate)
    metrics = dpo.train_round(tiny_policy, optimizer, batches, ref, cfg, accelerator)
    assert len(metrics) == 8
    assert {"loss", "reward_margin", "pair_accuracy", "chosen_logps", "grad_norm", "lr"} <= set(metrics[0])
    with torch.no_grad():
        chosen, rejected = dpo.batch_logps(tiny_policy, batches[0])
    margin_after = (chosen - rejected) - (ref[0][0] - ref[0][1])
    assert (margin_after > 0).all(), f"{loss}: the policy did not come to prefer the chosen responses"
    if extra.get("rpo_alpha"):
        assert (chosen > ref[0][0]).all()  # the NLL term raises the chosen likelihood itself


@pytest.mark.parametrize("loss,extra", [("simpo", {"beta": 2.0, "simpo_gamma": 0.5}),
                                        ("orpo", {"orpo_lambda": 1.0})])
def test_reference_free_losses_train_without_a_reference(tiny_policy, loss, extra):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    cfg = DPOConfig(loss=loss, learning_rate=1e-2, epochs=1, max_steps=8, batch_size=2, mixed_precision="no", **extra)
    pairs = [([1, 2, 3], [10, 11, 12, 2], [20, 21, 2]), ([4, 5], [13, 14, 2], [22, 23, 24, 2])]
    batches = [dpo.collate_pairs([dpo.encode_pair(p, c, r, 32) for p, c, r in pairs], pad_id=0)]
    count_c, count_r = dpo.response_token_counts(batches[0])
    assert count_c.tolist() == [4, 3] and count_r.tolist() == [3, 4]

    def average_margin():
        with torch.no_grad():
            chosen, rejected = dpo.batch_logps(tiny_policy, batches[0])
        return chosen / count_c - rejected / count_r

    before = average_margin()
    optimizer = torch.optim.AdamW(tiny_policy.parameters(), lr=cfg.learning_rate)
    metrics = dpo.train_round(tiny_policy, optimizer, batches, None, cfg, accelerator)  # ref=None: no reference pass
    assert len(metrics) == 8
    assert {"loss", "reward_margin", "pair_accuracy", "chosen_logps", "rejected_logps", "grad_norm", "lr",
            "train_tokens_per_s"} <= set(metrics[0])
    assert "kl" not in metrics[0]  # undefined without a reference
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    assert (average_margin() > before).all(), f"{loss}: the per-token chosen-minus-rejected margin did not grow"
    assert metrics[-1]["reward_margin"] > metrics[0]["reward_margin"]
    if loss == "simpo":  # the logged margin is the loss's own: beta × the per-token average margin
        assert abs(metrics[0]["reward_margin"] - 2.0 * before.mean().item()) < 1e-4


def test_reference_based_loss_without_reference_is_an_error(tiny_policy):
    from accelerate import Accelerator

    batches = [dpo.collate_pairs([dpo.encode_pair([1, 2], [10, 2], [20, 2], 32)], pad_id=0)]
    optimizer = torch.optim.AdamW(tiny_policy.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="needs reference log-probs"):
        dpo.train_round(tiny_policy, optimizer, batches, None, DPOConfig(loss="sigmoid", mixed_precision="no"),
                        Accelerator(cpu=True))
