"""The DPO update's training options on a tiny random Llama (fp32, CPU): soft labels for
kept ties, the KL metric, LR schedules, gradient accumulation and clipping, gradient
checkpointing, LoRA (merged weights, base as reference, adapter on disk) and the
optimizer state carried across rounds."""

import copy
import math

import pytest
import torch

from online_dpo.config import DPOConfig, LoRAConfig
from online_dpo.train import lora, optim
from online_dpo.train.logps import batch_logps, reference_logps
from online_dpo.train.losses import kl_to_reference, sigmoid_dpo_loss, soft_label
from online_dpo.train.packing import make_batches
from online_dpo.train.update import train_round
from tests.conftest import tiny_llama


def synthetic_pairs(n: int, tie_every: int = 0):
    """Fixed random token pairs of varied lengths; every `tie_every`-th pair a kept tie."""
    g = torch.Generator().manual_seed(1)

    def tokens():
        return torch.randint(3, 64, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()

    prompt_ids = {f"p{i}": tokens() for i in range(3)}
    pairs = [{"prompt_id": f"p{i % 3}", "chosen_token_ids": tokens(), "rejected_token_ids": tokens()} for i in range(n)]
    for i, p in enumerate(pairs):
        if tie_every and i % tie_every == tie_every - 1:
            p["chosen_prob"] = 0.5
    return pairs, prompt_ids


@pytest.fixture
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def run_update(model, pairs, prompt_ids, cfg, accelerator, optimizer=None, seed=3):
    batches, _ = make_batches(pairs, prompt_ids, batch_size=cfg.batch_size, max_length=cfg.max_length, pad_id=0, seed=seed)
    ref = reference_logps(model, batches, accelerator)
    optimizer = optimizer or optim.build_optimizer(model, cfg)
    return train_round(model, optimizer, batches, ref, cfg, accelerator), batches, ref


def max_param_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters(), strict=True))


# --- soft labels --------------------------------------------------------------------------

# Two pairs with preference logits 2 and -4; beta 0.5 gives x = 1 and x = -2.
PC, PR = torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -1.0])
RC, RR = torch.tensor([-2.0, -1.0]), torch.tensor([-2.0, -2.0])


def test_soft_labels_match_hand_computed_values():
    # -log sigmoid(1) = 0.313262, -log sigmoid(-1) = 1.313262, -log sigmoid(-2) = 2.126928, -log sigmoid(2) = 0.126928
    tie_and_hard, _, _ = sigmoid_dpo_loss(PC, PR, RC, RR, beta=0.5, chosen_prob=torch.tensor([0.5, 1.0]))
    assert torch.allclose(tie_and_hard, torch.tensor([0.5 * 0.313262 + 0.5 * 1.313262, 2.126928]), atol=1e-6)
    # ε = 0.1: a tie stays 0.5 (p_eff = 0.5·0.9 + 0.5·0.1); a reversed label p = 0 becomes p_eff = 0.1
    smoothed, _, _ = sigmoid_dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1,
                                          chosen_prob=torch.tensor([0.5, 0.0]))
    assert torch.allclose(smoothed, torch.tensor([0.813262, 0.1 * 2.126928 + 0.9 * 0.126928]), atol=1e-6)
    assert torch.allclose(soft_label(torch.tensor([1.0, 0.5, 0.0]), 0.1), torch.tensor([0.9, 0.5, 0.1]))


def test_a_tie_pulls_the_margin_toward_zero():
    # d/dx of -(0.5 log σ(x) + 0.5 log σ(-x)) = σ(x) - 0.5: 0 at x = 0, σ(1) - 0.5 = 0.231059 at x = 1
    for margin, grad in [(0.0, 0.0), (2.0, 0.231059), (-2.0, -0.231059)]:
        pc = torch.tensor([margin], requires_grad=True)  # x = beta·margin = margin / 2
        loss, _, _ = sigmoid_dpo_loss(pc, torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=0.5,
                                          chosen_prob=torch.tensor([0.5]))
        loss.sum().backward()
        assert abs(pc.grad.item() - 0.5 * grad) < 1e-6  # chain rule: dx/dpc = beta


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_hard_labels_as_a_tensor_are_bit_identical_to_no_labels(smoothing):
    grads = []
    for probs in (None, torch.ones(2)):
        pc = PC.clone().requires_grad_()
        losses, _, _ = sigmoid_dpo_loss(pc, PR, RC, RR, beta=0.5, label_smoothing=smoothing, chosen_prob=probs)
        losses.sum().backward()
        grads.append((losses.detach(), pc.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_make_batches_carries_chosen_prob_and_nll_weight_per_pair_and_missing_means_one():
    pairs, prompt_ids = synthetic_pairs(5)
    pairs[1]["chosen_prob"], pairs[3]["chosen_prob"] = 0.5, 1.0  # the others have no key
    pairs[2]["chosen_nll_weight"], pairs[4]["chosen_nll_weight"] = 0.0, 1.0  # nor this one (earlier runs' records)
    cfg = DPOConfig(batch_size=2)
    batches, order = make_batches(pairs, prompt_ids, batch_size=cfg.batch_size, max_length=cfg.max_length, pad_id=0, seed=9)
    assert order == torch.randperm(5, generator=torch.Generator().manual_seed(9)).tolist()  # a seeded shuffle
    got = torch.cat([b.chosen_prob for b in batches]).tolist()
    assert got == [0.5 if i == 1 else 1.0 for i in order]
    assert torch.cat([b.chosen_nll_weight for b in batches]).tolist() == [0.0 if i == 2 else 1.0 for i in order]
    assert torch.equal(batches[0].shard(1, 2).chosen_nll_weight, batches[0].chosen_nll_weight[1:])
    # each pair's label sits with that pair's tokens
    first = batches[0]
    assert first.rows.input_ids[0, len(prompt_ids[pairs[order[0]]["prompt_id"]]):].tolist()[:2] == pairs[order[0]]["chosen_token_ids"][:2]
    assert [b.has_soft_labels for b in batches] == [0.5 in b.chosen_prob.tolist() for b in batches]


def test_kept_ties_need_the_sigmoid_loss(accelerator):
    pairs, prompt_ids = synthetic_pairs(4, tie_every=2)
    with pytest.raises(ValueError, match="dpo.loss=sigmoid"):
        run_update(tiny_llama(), pairs, prompt_ids, DPOConfig(loss="ipo", batch_size=2, mixed_precision="no"), accelerator)


def test_make_batches_splits_evenly_over_processes_or_says_why():
    pairs, prompt_ids = synthetic_pairs(7)
    batches, order = make_batches(pairs, prompt_ids, batch_size=4, max_length=192, pad_id=0, seed=1, num_processes=2)
    assert len(order) == 6 and len(set(order)) == 6  # the pair left out is in no batch
    assert [b.num_pairs for b in batches] == [4, 2]  # 7 pairs: one left out so the last batch splits
    shards = [batches[0].shard(i, 2) for i in range(2)]
    for field in ("input_ids", "position_ids", "segment", "predictor"):  # one row per pair, in order
        assert torch.equal(torch.cat([getattr(s.rows, field) for s in shards]), getattr(batches[0].rows, field))
    with pytest.raises(ValueError, match="multiple of 2"):
        make_batches(pairs, prompt_ids, batch_size=3, max_length=192, pad_id=0, seed=1, num_processes=2)
    with pytest.raises(ValueError, match="cannot be split evenly over 4 processes"):
        batches[1].shard(0, 4)


# --- metrics ------------------------------------------------------------------------------

def test_kl_to_reference_matches_hand_computed_value():
    # reference - policy: chosen (-2+1, -1+4) = (-1, 3), rejected (-2+3, -2+1) = (1, -1); mean 0.5
    assert kl_to_reference(PC, PR, RC, RR).item() == 0.5
    # = -(chosen_reward + rejected_reward) / (2 beta) averaged over pairs
    _, rew_c, rew_r = sigmoid_dpo_loss(PC, PR, RC, RR, beta=0.5)
    assert abs(-(rew_c + rew_r).mean().item() / (2 * 0.5) - 0.5) < 1e-6


def test_round_metrics_include_rewards_and_kl(accelerator):
    pairs, prompt_ids = synthetic_pairs(4)
    cfg = DPOConfig(beta=0.5, learning_rate=1e-2, max_steps=3, batch_size=4, mixed_precision="no")
    metrics, _, _ = run_update(tiny_llama(), pairs, prompt_ids, cfg, accelerator)
    assert {"loss", "reward_margin", "pair_accuracy", "chosen_logps", "rejected_logps", "chosen_reward",
            "rejected_reward", "kl", "grad_norm", "lr", "train_tokens_per_s"} <= set(metrics[0])
    assert metrics[0]["kl"] == 0.0 and metrics[0]["chosen_reward"] == 0.0  # the reference is the policy at step 0
    assert metrics[-1]["kl"] != 0.0
    for m in metrics:
        assert abs(m["reward_margin"] - (m["chosen_reward"] - m["rejected_reward"])) < 1e-6
        assert abs(m["kl"] + (m["chosen_reward"] + m["rejected_reward"]) / (2 * cfg.beta)) < 1e-5


# --- LR schedule, accumulation, clipping -----------------------------------------------------

@pytest.mark.parametrize("schedule,expected", [
    # 2 warmup steps from 0, then 4 more steps; lr 1e-2
    ("constant", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.0, 0.5, 1.0, 0.75, 0.5, 0.25]),  # (6 - s) / (6 - 2)
    ("cosine", [0.0, 0.5, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]),
])
def test_lr_schedule_per_step(accelerator, schedule, expected):
    pairs, prompt_ids = synthetic_pairs(6)
    cfg = DPOConfig(learning_rate=1e-2, warmup_steps=2, lr_schedule=schedule, batch_size=1, max_steps=6,
                    mixed_precision="no")
    metrics, _, _ = run_update(tiny_llama(), pairs, prompt_ids, cfg, accelerator)
    assert [m["lr"] for m in metrics] == pytest.approx([1e-2 * e for e in expected], abs=1e-12)


def test_a_schedule_spanning_the_campaign_continues_across_rounds(accelerator):
    """dpo.lr_schedule_span=campaign (semi-online): round r enters one schedule over all rounds at
    r x max_steps, so three rounds of 2 steps follow the single 6-step schedule above."""
    cfg = DPOConfig(learning_rate=1e-2, warmup_steps=2, lr_schedule="linear", batch_size=1, max_steps=2,
                    mixed_precision="no", lr_schedule_span="campaign")
    pairs, prompt_ids = synthetic_pairs(2)
    model = tiny_llama()
    optimizer = optim.build_optimizer(model, cfg)
    lrs = []
    for r in range(3):
        batches, _ = make_batches(pairs, prompt_ids, batch_size=cfg.batch_size, max_length=cfg.max_length, pad_id=0, seed=3)
        ref = reference_logps(model, batches, accelerator)
        lrs += [m["lr"] for m in train_round(model, optimizer, batches, ref, cfg, accelerator, schedule_rounds=(r, 3))]
    assert lrs == pytest.approx([1e-2 * e for e in [0.0, 0.5, 1.0, 0.75, 0.5, 0.25]], abs=1e-12)


def test_logged_lr_is_the_one_used(accelerator):
    pairs, prompt_ids = synthetic_pairs(2)
    model = tiny_llama()
    before = copy.deepcopy(model)
    cfg = DPOConfig(learning_rate=1e-2, warmup_steps=2, batch_size=2, max_steps=1, mixed_precision="no")
    metrics, _, _ = run_update(model, pairs, prompt_ids, cfg, accelerator)
    assert metrics[0]["lr"] == 0.0 and max_param_diff(model, before) == 0.0  # warmup's first step: lr 0, no change
    cfg.max_steps = 2
    metrics, _, _ = run_update(model, pairs, prompt_ids, cfg, accelerator)
    assert metrics[1]["lr"] == 5e-3 and max_param_diff(model, before) > 0


@pytest.mark.parametrize("num_pairs", [6, 7])
def test_accumulation_equals_the_larger_batch(accelerator, num_pairs):
    # 7 pairs: batch 4 -> [4], [3]; batch 2 x accumulation 2 -> [2, 2], [2, 1]: uneven micro-batches
    # are weighted by their pairs, so each step is the same mean over the same pairs.
    pairs, prompt_ids = synthetic_pairs(num_pairs, tie_every=3)
    models, logs = [], []
    for batch_size, accum in [(4, 1), (2, 2)]:
        model = tiny_llama()
        cfg = DPOConfig(beta=0.5, learning_rate=1e-3, batch_size=batch_size, grad_accum_steps=accum, epochs=1,
                        rpo_alpha=0.3, mixed_precision="no")
        metrics, _, _ = run_update(model, pairs, prompt_ids, cfg, accelerator)
        models.append(model)
        logs.append(metrics)
    assert len(logs[0]) == len(logs[1]) == 2
    assert max_param_diff(*models) < 1e-6
    assert max_param_diff(models[0], tiny_llama()) > 1e-4  # and they did move
    for a, b in zip(*logs):
        for k in ("loss", "reward_margin", "kl", "grad_norm", "chosen_logps"):
            assert abs(a[k] - b[k]) < 1e-5, k


def test_gradients_are_clipped_to_max_grad_norm(accelerator):
    pairs, prompt_ids = synthetic_pairs(4)
    cfg = DPOConfig(beta=0.5, batch_size=4, max_steps=1, mixed_precision="no", rpo_alpha=0.0)  # the DPO term alone
    model = tiny_llama()
    batches, _ = make_batches(pairs, prompt_ids, batch_size=cfg.batch_size, max_length=cfg.max_length, pad_id=0, seed=3)
    ref = reference_logps(model, batches, accelerator)
    # the full-batch gradient norm, by hand
    probe = copy.deepcopy(model).train()
    losses, _, _ = sigmoid_dpo_loss(*batch_logps(probe, batches[0]), *ref[0], beta=0.5)
    losses.mean().backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in probe.parameters()])).item()
    # plain SGD with lr 1: the step is exactly the clipped gradient
    cfg.learning_rate, cfg.max_grad_norm = 1.0, norm / 4
    before = copy.deepcopy(model)
    metrics = train_round(model, torch.optim.SGD(model.parameters(), lr=1.0), batches, ref, cfg, accelerator)
    step = torch.linalg.vector_norm(torch.stack([(a - b).norm() for a, b in zip(model.parameters(), before.parameters())]))
    assert abs(metrics[0]["grad_norm"] - norm) < 1e-4 * norm  # logged: the norm before clipping
    assert abs(step.item() - norm / 4) < 1e-3 * norm


# --- gradient checkpointing ----------------------------------------------------------------

def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    pairs, prompt_ids = synthetic_pairs(4)
    batch = make_batches(pairs, prompt_ids, batch_size=4, max_length=192, pad_id=0, seed=3)[0][0]
    results = []
    for checkpointing in (False, True):
        model = tiny_llama().train()
        if checkpointing:
            optim.enable_gradient_checkpointing(model)
            assert model.is_gradient_checkpointing
        calls = []
        model.model.layers[0].register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        chosen, rejected = batch_logps(model, batch)
        losses, _, _ = sigmoid_dpo_loss(chosen, rejected, chosen.detach() * 0.9, rejected.detach() * 1.1, beta=0.5)
        losses.mean().backward()
        results.append((losses.detach(), [p.grad.clone() for p in model.parameters()], len(calls)))
    (loss_a, grads_a, calls_a), (loss_b, grads_b, calls_b) = results
    assert (calls_a, calls_b) == (1, 2)  # checkpointing re-ran the layer's forward in backward
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads_a, grads_b))


# --- LoRA ------------------------------------------------------------------------------------

@pytest.fixture
def lora_policy():
    """(base model as it was, LoRA-wrapped copy with random B so the adapter does something)."""
    base = tiny_llama()
    model = lora.wrap_lora(copy.deepcopy(base), LoRAConfig(r=2, alpha=8, target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return base, model


IDS = torch.tensor([[1, 5, 9, 13, 17, 21]])


def logits_of(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_merged_weights_are_base_plus_scaled_lora_product(lora_policy):
    base, model = lora_policy
    merged = lora.merged_weights(model)
    names = [n for n, _ in merged]
    assert names == list(base.state_dict().keys())  # the plain HF names, in order
    merged = dict(merged)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    a, b = q.lora_A["default"].weight, q.lora_B["default"].weight  # [r, in], [out, r]
    w = base.model.layers[0].self_attn.q_proj.weight
    by_hand = w + (8 / 2) * b @ a  # scaling = alpha / r
    assert torch.allclose(merged["model.layers.0.self_attn.q_proj.weight"], by_hand, atol=1e-6)
    assert not torch.allclose(by_hand, w)
    assert torch.equal(merged["model.layers.0.self_attn.k_proj.weight"], base.model.layers[0].self_attn.k_proj.weight)
    # the merged weights in a plain model compute what the LoRA model computes
    plain = tiny_llama(seed=5)
    plain.load_state_dict(merged)
    assert torch.allclose(logits_of(plain), logits_of(model), atol=1e-5)
    # a plain model's weights are its state dict
    assert [n for n, _ in lora.merged_weights(base)] == names


def test_adapter_disabled_is_the_base_model(lora_policy):
    base, model = lora_policy
    assert not torch.allclose(logits_of(model), logits_of(base), atol=1e-3)
    with lora.adapter_disabled(model):
        assert torch.equal(logits_of(model), logits_of(base))
    assert not torch.allclose(logits_of(model), logits_of(base), atol=1e-3)  # adapter back on
    with pytest.raises(ValueError, match="lora"), lora.adapter_disabled(base):
        pass


def test_lora_optimizer_and_update_touch_only_the_adapters(lora_policy, accelerator):
    base, model = lora_policy
    cfg = DPOConfig(beta=0.5, learning_rate=1e-2, batch_size=4, max_steps=2, mixed_precision="no")
    optimizer = optim.build_optimizer(model, cfg)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    adapters = {id(p) for n, p in model.named_parameters() if "lora_" in n}
    assert in_optimizer == adapters and len(adapters) == 2 * 2 * 2  # A and B, 2 modules, 2 layers
    pairs, prompt_ids = synthetic_pairs(4)
    before = dict(lora.merged_weights(model))
    run_update(model, pairs, prompt_ids, cfg, accelerator, optimizer=optimizer)
    after = dict(lora.merged_weights(model))
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert not torch.allclose(after["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"])
    with lora.adapter_disabled(model):  # the base stayed the base
        assert torch.equal(logits_of(model), logits_of(base))


def test_adapter_and_merged_checkpoints_reload(lora_policy, tmp_path):
    from transformers import AutoModelForCausalLM

    base, model = lora_policy
    lora.save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    resumed = lora.wrap_lora(copy.deepcopy(base), LoRAConfig(), adapter_dir=tmp_path / "adapter")
    assert torch.equal(logits_of(resumed), logits_of(model))
    assert any(p.requires_grad for n, p in resumed.named_parameters() if "lora_" in n)  # trainable again
    lora.save_merged(model, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.allclose(logits_of(plain), logits_of(model), atol=1e-5)


def test_unknown_lora_targets_list_the_model_layers():
    from online_dpo.config import ConfigError

    with pytest.raises(ConfigError, match="q_proj"):
        lora.wrap_lora(tiny_llama(), LoRAConfig(target_modules=["attn_c"]))


# --- optimizer state across rounds ---------------------------------------------------------

def test_optimizer_state_save_and_load_continue_identically(accelerator, tmp_path):
    pairs, prompt_ids = synthetic_pairs(6)
    cfg = DPOConfig(beta=0.5, learning_rate=1e-3, batch_size=2, epochs=1, mixed_precision="no", optimizer_state="carry")
    model = tiny_llama()
    optimizer = optim.build_optimizer(model, cfg)
    run_update(model, pairs, prompt_ids, cfg, accelerator, optimizer=optimizer)  # round 0
    optim.save_optimizer_state(optimizer, tmp_path)

    resumed = copy.deepcopy(model)
    resumed_opt = optim.build_optimizer(resumed, cfg)
    assert optim.load_optimizer_state(resumed_opt, tmp_path)
    fresh = copy.deepcopy(model)
    fresh_opt = optim.build_optimizer(fresh, cfg)
    assert not optim.load_optimizer_state(fresh_opt, tmp_path / "no_checkpoint")

    for m, opt in [(model, optimizer), (resumed, resumed_opt), (fresh, fresh_opt)]:  # round 1
        run_update(m, pairs, prompt_ids, cfg, accelerator, optimizer=opt, seed=4)
    assert max_param_diff(model, resumed) == 0.0  # carried moments: the very same steps
    assert max_param_diff(model, fresh) > 1e-6  # and the moments matter

    optim.reset_optimizer_state(optimizer)  # optimizer_state=fresh: zeroed in place
    assert optimizer.state and all(float(t.abs().max()) == 0 for st in optimizer.state.values() for t in st.values())
    # a reset optimizer takes the very steps a brand-new one takes
    again = copy.deepcopy(model)
    again_opt = optim.build_optimizer(again, cfg)
    run_update(model, pairs, prompt_ids, cfg, accelerator, optimizer=optimizer, seed=6)
    run_update(again, pairs, prompt_ids, cfg, accelerator, optimizer=again_opt, seed=6)
    assert max_param_diff(model, again) == 0.0
