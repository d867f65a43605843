import math

import pytest
import torch

from online_dpo.train.logps import batch_logps, response_logps, response_token_counts
from online_dpo.train.losses import (
    chosen_nll,
    hinge_loss,
    ipo_loss,
    kto_loss,
    log_odds,
    logp_drift,
    orpo_loss,
    robust_dpo_loss,
    sigmoid_dpo_loss,
    simpo_loss,
)
from online_dpo.train.packing import collate_pairs, encode_pair, pack_rows, shared_prompt_mask
from online_dpo.train.update import nll_weight
from tests.conftest import tiny_llama


def test_sigmoid_dpo_loss_matches_hand_computed_values():
    # pair 0: policy margin (-1) - (-3) = 2, reference margin (-2) - (-2) = 0 -> logits 2
    # pair 1: policy margin (-4) - (-1) = -3, reference margin (-1) - (-2) = 1 -> logits -4
    pc, pr = torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -1.0])
    rc, rr = torch.tensor([-2.0, -1.0]), torch.tensor([-2.0, -2.0])
    beta = 0.5
    losses, rew_c, rew_r = sigmoid_dpo_loss(pc, pr, rc, rr, beta)
    expected = [math.log1p(math.exp(-beta * 2)), math.log1p(math.exp(-beta * -4))]  # -log sigmoid(x) = log(1+e^-x)
    assert torch.allclose(losses, torch.tensor(expected), atol=1e-6)
    assert abs(expected[0] - 0.313262) < 1e-6 and abs(expected[1] - 2.126928) < 1e-6
    assert torch.allclose(rew_c, torch.tensor([0.5, -1.5]))  # beta * (policy - ref), chosen
    assert torch.allclose(rew_r, torch.tensor([-0.5, 0.5]))


def test_loss_at_equal_policy_and_reference_is_log2_and_gradient_favours_chosen():
    pc = torch.tensor([-2.0], requires_grad=True)
    pr = torch.tensor([-2.0], requires_grad=True)
    losses, _, _ = sigmoid_dpo_loss(pc, pr, torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.1)
    assert abs(losses.item() - math.log(2)) < 1e-6
    losses.sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()  # descent raises chosen, lowers rejected
    assert abs(pc.grad.item() + 0.05) < 1e-6  # d/dx -log sig(beta x) at 0 = -beta/2


# The same two pairs as above: preference logits 2 and -4; with beta 0.5, x = 1 and -2.
PC, PR = torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -1.0])
RC, RR = torch.tensor([-2.0, -1.0]), torch.tensor([-2.0, -2.0])


def test_response_logps_reads_each_token_from_its_predictor():
    # one row: prompt [7, 8] | chosen [1, 2] | rejected [4]; logits for positions 1.. (start = 1)
    rows = pack_rows([([7, 8], [[1, 2], [4]])], pad_id=0)
    assert rows.predictor.tolist() == [[0, 0, 1, 2, 1]]  # the rejected token is predicted by the prompt's last
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 9)  # positions 1, 2, 3, 4
    lp = torch.log_softmax(logits, -1)[0]
    chosen = lp[0, 1] + lp[1, 2]  # position 1 predicts token 1, position 2 predicts token 2
    rejected = lp[0, 4]  # position 1 (the prompt's last) predicts token 4
    got = response_logps(logits, rows, start=1, segments=2)
    assert torch.allclose(got, torch.stack([chosen, rejected]).unsqueeze(0), atol=1e-6)


def test_collate_pairs_shares_the_prompt_and_pads_each_row_to_the_longest_pair():
    enc = [encode_pair([7, 8], [1, 2, 3], [4], max_length=16), encode_pair([9], [5], [6], max_length=16)]
    b = collate_pairs(enc, pad_id=0)
    assert b.rows.input_ids.tolist() == [[7, 8, 1, 2, 3, 4], [9, 5, 6, 0, 0, 0]]
    assert b.rows.position_ids.tolist()[0] == [0, 1, 2, 3, 4, 2]  # the rejected response restarts after the prompt
    assert b.rows.segment.tolist() == [[0, 0, 1, 1, 1, 2], [0, 1, 2, -1, -1, -1]]
    assert b.rows.num_tokens == 9 and response_token_counts(b)[0].tolist() == [3, 1]
    mask = shared_prompt_mask(b.rows.segment)[0, 0].int().tolist()
    assert mask[5] == [1, 1, 0, 0, 0, 1]  # rejected sees the prompt and itself, never the chosen tokens
    assert mask[4] == [1, 1, 1, 1, 1, 0]  # chosen sees the prompt and its own earlier tokens
    assert encode_pair([7, 8], [1, 2, 3], [4], max_length=3) == ([7, 8], [1], [4])


def test_shared_prompt_rows_give_the_log_probs_of_separate_sequences():
    """A pair's two responses scored in one row equal each (prompt + response) run alone,
    values and gradients, for a padded batch of pairs with prompts of different lengths."""
    model = tiny_llama(num_attention_heads=4, num_key_value_heads=2)
    pairs = [([1, 2, 3], [10, 11, 12, 2], [20, 21, 2]), ([4, 5], [13, 2], [22, 23, 24, 25, 2]), ([6], [7], [8, 9])]
    batch = collate_pairs([encode_pair(p, c, r, 32) for p, c, r in pairs], pad_id=0)
    chosen, rejected = batch_logps(model, batch)
    (chosen.sum() + 2 * rejected.sum()).backward()
    shared_grad = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    def alone(prompt, response):
        ids = torch.tensor([prompt + response])
        lp = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt) - 1:-1], -1)
        return lp.gather(1, torch.tensor(response).unsqueeze(1)).sum()

    exp_c = torch.stack([alone(p, c) for p, c, _ in pairs])
    exp_r = torch.stack([alone(p, r) for p, _, r in pairs])
    (exp_c.sum() + 2 * exp_r.sum()).backward()
    assert torch.allclose(chosen, exp_c, atol=1e-5) and torch.allclose(rejected, exp_r, atol=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(shared_grad[n], p.grad, atol=1e-5), n

    # an empty response scores 0 (nothing to sum) and leaves the rest of its batch alone
    with torch.no_grad():
        empty = batch_logps(model, collate_pairs([([1, 2, 3], [10, 2], []), ([4], [], [])], pad_id=0))
        assert empty[1].tolist() == [0.0, 0.0] and empty[0][1].item() == 0.0
        assert torch.allclose(empty[0][0], alone([1, 2, 3], [10, 2]), atol=1e-5)

    # eager attention takes the same mask in additive form
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        eager_c, eager_r = batch_logps(model, batch)
    assert torch.allclose(eager_c, exp_c, atol=1e-5) and torch.allclose(eager_r, exp_r, atol=1e-5)


def test_conservative_and_robust_dpo_match_hand_computed_values():

    l_pos = [math.log1p(math.exp(-1.0)), math.log1p(math.exp(2.0))]  # -log sigmoid(x) for x = 1, -2
    l_neg = [math.log1p(math.exp(1.0)), math.log1p(math.exp(-2.0))]  # -log sigmoid(-x)
    cdpo, _, _ = sigmoid_dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1)
    assert torch.allclose(cdpo, torch.tensor([0.9 * p + 0.1 * n for p, n in zip(l_pos, l_neg)]), atol=1e-6)
    assert abs(cdpo[0].item() - 0.413262) < 1e-6  # 0.9 * 0.313262 + 0.1 * 1.313262
    rdpo, _, _ = robust_dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1)
    assert abs(rdpo[0].item() - 0.188262) < 1e-6  # (0.9 * 0.313262 - 0.1 * 1.313262) / 0.8
    plain, _, _ = sigmoid_dpo_loss(PC, PR, RC, RR, beta=0.5)
    assert torch.equal(sigmoid_dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.0)[0], plain)


def test_ipo_and_hinge_match_hand_computed_values():

    ipo, rc, rr = ipo_loss(PC, PR, RC, RR, beta=0.5)
    assert ipo.tolist() == [1.0, 25.0]  # (2 - 1)^2, (-4 - 1)^2 with 1/(2 beta) = 1
    assert rc.tolist() == [0.5, -1.5] and rr.tolist() == [-0.5, 0.5]
    hinge, _, _ = hinge_loss(PC, PR, RC, RR, beta=0.5)
    assert hinge.tolist() == [0.0, 3.0]  # max(0, 1 - 1), max(0, 1 + 2)


def test_chosen_nll_is_per_token():

    assert chosen_nll(torch.tensor([-6.0, -3.0]), torch.tensor([3, 0])).tolist() == [2.0, 3.0]  # 0 tokens -> 1


def test_simpo_matches_hand_computed_values():

    # per-token averages; beta 2, gamma 0.5: x = 2·(-1 - -2) - 0.5 = 1.5 and 2·(-2 - -1.5) - 0.5 = -1.5
    losses, rew_c, rew_r = simpo_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.5]), beta=2.0, gamma=0.5)
    assert torch.allclose(losses, torch.tensor([math.log1p(math.exp(-1.5)), math.log1p(math.exp(1.5))]), atol=1e-6)
    assert abs(losses[0].item() - 0.201413) < 1e-6 and abs(losses[1].item() - 1.701413) < 1e-6
    assert rew_c.tolist() == [-2.0, -4.0] and rew_r.tolist() == [-4.0, -3.0]  # beta · average log-prob
    # gamma is a margin the rewards must clear: with it the loss at equal rewards exceeds log 2
    at_tie, _, _ = simpo_loss(torch.tensor([-1.0]), torch.tensor([-1.0]), beta=2.0, gamma=0.5)
    assert abs(at_tie.item() - math.log1p(math.exp(0.5))) < 1e-6


def test_orpo_matches_hand_computed_values():

    # p_chosen = 0.5 -> odds 1, log odds 0; p_rejected = 0.2 -> odds 0.25; log odds ratio = log 4
    # -log σ(log 4) = log(1 + 1/4) = log 1.25; NLL = -log 0.5; loss = log 2 + 0.1·log 1.25
    losses, odds_c, odds_r = orpo_loss(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.2)]), lam=0.1)
    assert abs(losses.item() - (math.log(2) + 0.1 * math.log(1.25))) < 1e-6
    assert abs(losses.item() - 0.715461) < 1e-6
    assert abs(odds_c.item()) < 1e-6 and abs(odds_r.item() - math.log(0.25)) < 1e-6
    # lam = 0 is the chosen response's per-token NLL alone
    assert abs(orpo_loss(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.2)]), lam=0.0)[0].item()
               - math.log(2)) < 1e-6


def test_log_odds_is_stable_near_probability_one():

    x = torch.tensor([-1e-3, -1e-5, 0.0], requires_grad=True)
    lo = log_odds(x)
    assert torch.isfinite(lo).all()
    # float64 reference for x = -1e-3: log(p / (1 - p))
    p = math.exp(-1e-3)
    assert abs(lo[0].item() - math.log(p / (1 - p))) < 1e-4
    assert lo[0] < lo[1] <= lo[2]  # monotone, the clamp caps p = 1 at a finite value
    lo.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_kto_matches_hand_computed_values_and_detaches_the_reference_point():

    # r = policy - ref = [1, -1, 0]; mean 0 -> z0 = 0
    pol = torch.tensor([-1.0, -3.0, -2.0], requires_grad=True)
    ref = torch.tensor([-2.0, -2.0, -2.0])
    desirable = torch.tensor([True, False, True])
    losses, rewards, z0 = kto_loss(pol, ref, desirable, beta=1.0, desirable_weight=1.0, undesirable_weight=2.0)
    s1 = 1 / (1 + math.exp(-1))  # σ(1)
    assert z0.item() == 0.0
    assert torch.allclose(losses, torch.tensor([1 - s1, 2 * (1 - s1), 0.5]), atol=1e-6)
    assert abs(losses[0].item() - 0.268941) < 1e-6
    assert rewards.tolist() == [1.0, -1.0, 0.0]
    losses.sum().backward()
    # with z0 detached each example's gradient is its own term only: d/dr λ(1 - σ(β(r - z0))) = -λβσ(1-σ)
    assert torch.allclose(pol.grad, torch.tensor([-s1 * (1 - s1), 2 * s1 * (1 - s1), -0.25]), atol=1e-6)
    # the reference point is the batch's mean reward, clamped at 0 from below
    _, _, z_pos = kto_loss(torch.tensor([-1.0, -1.0]), torch.tensor([-2.0, -3.0]), torch.tensor([True, True]), beta=1.0)
    assert z_pos.item() == 1.5
    _, _, z_neg = kto_loss(torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([False]), beta=1.0)
    assert z_neg.item() == 0.0


def test_loss_types_say_what_each_loss_needs_and_the_config_check():
    import pytest

    from online_dpo.config import ConfigError, load_config
    from online_dpo.config.loss_type import LossType

    assert LossType("sigmoid").needs_reference and LossType("ipo").needs_reference
    assert not LossType("simpo").needs_reference and not LossType("orpo").needs_reference
    assert LossType("kto").needs_reference  # KTO compares with a reference, on unpaired examples
    assert [t.value for t in LossType if t.unpaired] == ["kto"]
    assert [t.value for t in LossType if t.nll_by_default] == ["sigmoid", "robust", "ipo", "hinge"]
    with pytest.raises(ValueError, match="unknown dpo.loss 'sigmod'; did you mean 'sigmoid'"):
        LossType("sigmod")
    with pytest.raises(ConfigError, match="did you mean 'sigmoid'"):
        load_config(None, ["dpo.loss=sigmod"])
    assert load_config(None, ["dpo.loss=simpo", "dpo.simpo_gamma=1.0"]).dpo.simpo_gamma == 1.0
    with pytest.raises(ConfigError, match="refreshed reference only"):
        load_config(None, ["dpo.reference=initial", "dpo.reference_logps=generation"])


def test_logp_drift_is_the_mean_change_per_kind_of_response_over_all_batches():
    before = [(torch.tensor([-10.0, -20.0]), torch.tensor([-30.0, -40.0])), (torch.tensor([-5.0]), torch.tensor([-6.0]))]
    after = [(torch.tensor([-11.0, -18.0]), torch.tensor([-35.0, -49.0])), (torch.tensor([-8.0]), torch.tensor([-6.0]))]
    chosen, rejected = logp_drift(before, after)
    assert chosen == pytest.approx((-1.0 + 2.0 - 3.0) / 3) and rejected == pytest.approx((-5.0 - 9.0 + 0.0) / 3)


def test_rpo_alpha_auto_adds_the_chosen_nll_to_reference_based_pair_losses_only():
    from online_dpo.config import DPOConfig, load_config

    assert [nll_weight(DPOConfig(loss=loss)) for loss in ("sigmoid", "robust", "ipo", "hinge")] == [1.0] * 4
    assert [nll_weight(DPOConfig(loss=loss)) for loss in ("simpo", "orpo", "kto")] == [0.0] * 3
    assert nll_weight(DPOConfig(loss="sigmoid", rpo_alpha=0.0)) == 0.0
    assert nll_weight(DPOConfig(loss="ipo", rpo_alpha=0.25)) == 0.25
    assert load_config("configs/quickstart.yaml", ["dpo.loss=kto"]).dpo.loss == "kto"  # auto needs no rpo_alpha=0
