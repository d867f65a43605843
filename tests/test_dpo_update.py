"""The update loop on a tiny random Llama (fast, no vLLM): every loss trains, and the
DPO objective moves the policy toward the chosen response."""

import pytest
import torch

from online_dpo.config import DPOConfig
from online_dpo.train.logps import batch_logps, reference_logps, response_token_counts
from online_dpo.train.losses import kto_loss
from online_dpo.train.packing import collate_pairs, encode_pair, make_example_batches
from online_dpo.train.update import KTO_METRICS, train_round
from tests.conftest import tiny_llama


@pytest.fixture
def tiny_policy():
    return tiny_llama()


@pytest.mark.parametrize("loss,extra", [("sigmoid", {}), ("sigmoid", {"label_smoothing": 0.1}),
                                        ("robust", {"label_smoothing": 0.1}), ("ipo", {}), ("hinge", {}),
                                        ("sigmoid", {"rpo_alpha": 1.0})])
def test_every_loss_raises_the_chosen_margin(tiny_policy, loss, extra):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    cfg = DPOConfig(loss=loss, beta=0.5, learning_rate=1e-2, epochs=1, max_steps=8, batch_size=2,
                    mixed_precision="no", **extra)
    pairs = [([1, 2, 3], [10, 11, 12, 2], [20, 21, 2]), ([4, 5], [13, 14, 2], [22, 23, 24, 2])]
    batches = [collate_pairs([encode_pair(p, c, r, 32) for p, c, r in pairs], pad_id=0)]
    ref = reference_logps(tiny_policy, batches, accelerator)
    optimizer = torch.optim.AdamW(tiny_policy.parameters(), lr=cfg.learning_rate)
    metrics = train_round(tiny_policy, optimizer, batches, ref, cfg, accelerator)
    assert len(metrics) == 8
    assert {"loss", "reward_margin", "pair_accuracy", "chosen_logps", "grad_norm", "lr"} <= set(metrics[0])
    with torch.no_grad():
        chosen, rejected = batch_logps(tiny_policy, batches[0])
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
    batches = [collate_pairs([encode_pair(p, c, r, 32) for p, c, r in pairs], pad_id=0)]
    count_c, count_r = response_token_counts(batches[0])
    assert count_c.tolist() == [4, 3] and count_r.tolist() == [3, 4]

    def average_margin():
        with torch.no_grad():
            chosen, rejected = batch_logps(tiny_policy, batches[0])
        return chosen / count_c - rejected / count_r

    before = average_margin()
    optimizer = torch.optim.AdamW(tiny_policy.parameters(), lr=cfg.learning_rate)
    metrics = train_round(tiny_policy, optimizer, batches, None, cfg, accelerator)  # ref=None: no reference pass
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

    batches = [collate_pairs([encode_pair([1, 2], [10, 2], [20, 2], 32)], pad_id=0)]
    optimizer = torch.optim.AdamW(tiny_policy.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="needs reference log-probs"):
        train_round(tiny_policy, optimizer, batches, None, DPOConfig(loss="sigmoid", mixed_precision="no"),
                        Accelerator(cpu=True))


def test_kto_raises_desirable_and_lowers_undesirable_examples(tiny_policy):
    from accelerate import Accelerator

    from online_dpo.config import KTOConfig

    accelerator = Accelerator(cpu=True)
    cfg = DPOConfig(loss="kto", beta=0.5, learning_rate=1e-2, epochs=1, max_steps=8, batch_size=4, mixed_precision="no")
    examples = [{"prompt_id": "p", "completion_token_ids": [10, 11, 12, 2], "label": True},
                {"prompt_id": "p", "completion_token_ids": [20, 21, 2], "label": False},
                {"prompt_id": "q", "completion_token_ids": [13, 14, 2], "label": True},
                {"prompt_id": "q", "completion_token_ids": [22, 23, 24, 2], "label": False}]
    batches, _ = make_example_batches(examples, {"p": [1, 2, 3], "q": [4, 5]}, batch_size=cfg.batch_size,
                                      max_length=cfg.max_length, pad_id=0, seed=3)
    assert len(batches) == 1 and batches[0].num_items == 4
    batch = batches[0]
    # each row is its example: the prompt then the response, the response mask on the response only
    desirable = batch.desirable.tolist()
    assert sorted(desirable) == [False, False, True, True]
    ref = reference_logps(tiny_policy, batches, accelerator)
    assert len(ref[0]) == 1 and ref[0][0].shape == (4,)
    with pytest.raises(ValueError, match="ExampleBatch"):
        train_round(tiny_policy, torch.optim.SGD(tiny_policy.parameters(), lr=0.0), batches, ref,
                        DPOConfig(loss="sigmoid"), accelerator)
    optimizer = torch.optim.AdamW(tiny_policy.parameters(), lr=cfg.learning_rate)
    metrics = train_round(tiny_policy, optimizer, batches, ref, cfg, accelerator,
                              kto=KTOConfig(desirable_weight=1.0, undesirable_weight=1.0))
    assert len(metrics) == 8
    first = metrics[0]
    assert set(KTO_METRICS) | {"reward_margin", "grad_norm", "lr"} <= set(first)
    # before the first step the policy is the reference: every reward and the KL are 0
    assert first["desirable_reward"] == pytest.approx(0, abs=1e-5) and first["kl"] == pytest.approx(0, abs=1e-5)
    # the loss at r = z0 = 0 is 1 - σ(0) = 0.5 for every example
    assert first["loss"] == pytest.approx(0.5, abs=1e-5)
    assert metrics[-1]["reward_margin"] > 0 and metrics[-1]["loss"] < first["loss"]
    with torch.no_grad():
        (after,) = batch_logps(tiny_policy, batch)
    moved = after - ref[0][0]
    good = batch.desirable
    assert (moved[good] > 0).all() and (moved[~good] < 0).all()


def test_kto_loss_with_a_given_reference_point():
    pol, ref = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.0])
    desirable = torch.tensor([True, False])
    losses, rewards, z0 = kto_loss(pol, ref, desirable, beta=2.0, z0=torch.tensor(0.25))
    # r = [1, -1]; desirable: 1 - σ(2·(1 - 0.25)) ; undesirable: 1 - σ(2·(0.25 - (-1)))
    expected = [1 - 1 / (1 + torch.exp(torch.tensor(-1.5))), 1 - 1 / (1 + torch.exp(torch.tensor(-2.5)))]
    assert torch.allclose(losses, torch.stack(expected))
    assert rewards.tolist() == [2.0, -2.0] and float(z0) == 0.25


def test_a_pair_whose_chosen_nll_weight_is_zero_trains_by_the_pair_loss_alone():
    """pairs.unseparated=no_nll: a pair of a prompt the judge did not separate keeps its DPO term
    but not the chosen-response NLL; the other pairs keep both."""
    from accelerate import Accelerator

    from online_dpo.config.loss_type import LossType
    from online_dpo.train.losses import chosen_nll, make_loss_fn
    from online_dpo.train.update import pair_step_sums

    pairs = [([1, 2, 3], [10, 11, 12, 2], [20, 21, 2]), ([4, 5], [13, 14, 2], [22, 23, 24, 2])]
    encoded = [encode_pair(p, c, r, 32) for p, c, r in pairs]

    def trained(rpo_alpha: float, weights: list[float]):
        model, accelerator = tiny_llama(), Accelerator(cpu=True)
        batches = [collate_pairs(encoded, pad_id=0, chosen_nll_weight=weights)]
        cfg = DPOConfig(beta=0.5, learning_rate=1e-2, max_steps=4, batch_size=2, mixed_precision="no", rpo_alpha=rpo_alpha)
        ref = reference_logps(model, batches, accelerator)
        train_round(model, torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate), batches, ref, cfg, accelerator)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    plain = trained(0.0, [1.0, 1.0])
    assert torch.equal(trained(1.0, [0.0, 0.0]), plain)  # no NLL on either pair: plain DPO, bit for bit
    assert not torch.allclose(trained(1.0, [1.0, 1.0]), plain)  # the NLL term changes the update

    # per pair: the second pair's loss lacks its NLL term, the first's has it
    batch = collate_pairs(encoded, pad_id=0, chosen_nll_weight=[1.0, 0.0])
    model = tiny_llama()
    with torch.no_grad():
        policy = batch_logps(model, batch)
    ref = (policy[0] - 1.0, policy[1] + 1.0)
    loss_fn = make_loss_fn(LossType.SIGMOID, beta=0.5)
    mean, _ = pair_step_sums(loss_fn, 2.0, batch, policy, ref, None)
    dpo, _, _ = loss_fn(*policy, *ref)
    nll = chosen_nll(policy[0], response_token_counts(batch)[0])
    assert mean.item() == pytest.approx(((dpo[0] + 2.0 * nll[0]) + dpo[1]).item() / 2)
