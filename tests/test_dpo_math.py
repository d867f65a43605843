import math

import torch

from online_dpo.dpo import collate_pairs, encode_pair, sequence_logps, sigmoid_dpo_loss


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


def test_sequence_logps_sums_only_response_tokens():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 5)
    labels = torch.tensor([[1, 2, 3, 4]])
    mask = torch.tensor([[0, 0, 1, 1]])  # tokens 3 and 4 are the response
    lp = torch.log_softmax(logits, -1)
    expected = lp[0, 1, 3] + lp[0, 2, 4]  # position t predicts token t+1
    assert torch.allclose(sequence_logps(logits, labels, mask), expected.unsqueeze(0), atol=1e-6)


def test_collate_pairs_masks_prompt_and_padding():
    enc = [encode_pair([7, 8], [1, 2, 3], [4], max_length=16)]
    b = collate_pairs(enc, pad_id=0)
    assert b.input_ids.tolist() == [[7, 8, 1, 2, 3], [7, 8, 4, 0, 0]]
    assert b.response_mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 0, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    # responses are cut to fit max_length
    assert encode_pair([7, 8], [1, 2, 3], [4], max_length=3)[0] == ([7, 8], [1])


# The same two pairs as above: preference logits 2 and -4; with beta 0.5, x = 1 and -2.
PC, PR = torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -1.0])
RC, RR = torch.tensor([-2.0, -1.0]), torch.tensor([-2.0, -2.0])


def test_conservative_and_robust_dpo_match_hand_computed_values():
    from online_dpo.dpo import robust_dpo_loss

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
    from online_dpo.dpo import hinge_loss, ipo_loss

    ipo, rc, rr = ipo_loss(PC, PR, RC, RR, beta=0.5)
    assert ipo.tolist() == [1.0, 25.0]  # (2 - 1)^2, (-4 - 1)^2 with 1/(2 beta) = 1
    assert rc.tolist() == [0.5, -1.5] and rr.tolist() == [-0.5, 0.5]
    hinge, _, _ = hinge_loss(PC, PR, RC, RR, beta=0.5)
    assert hinge.tolist() == [0.0, 3.0]  # max(0, 1 - 1), max(0, 1 + 2)


def test_chosen_nll_is_per_token():
    from online_dpo.dpo import chosen_nll

    assert chosen_nll(torch.tensor([-6.0, -3.0]), torch.tensor([3, 0])).tolist() == [2.0, 3.0]  # 0 tokens -> 1
