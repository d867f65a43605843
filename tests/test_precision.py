"""The update in each precision it can run in, forced in turn on whatever CPU runs the suite
(bf16 is native on some CPUs and emulated on AVX2-only ones, where `auto` never picks it, so
without this test the bf16 path would run only on other people's machines). The reference
pass and one optimizer step are each checked against the same computation written out here
in the same precision. The model is tiny because emulated bf16 is slow."""

import copy

import pytest
import torch

from online_dpo.config import DPOConfig
from online_dpo.train.logps import batch_logps, reference_logps
from online_dpo.train.losses import sigmoid_dpo_loss
from online_dpo.train.packing import collate_pairs, encode_pair
from online_dpo.train.update import train_round
from tests.conftest import tiny_llama

PAIRS = [([1, 2, 3], [10, 11, 12, 2], [20, 21, 2]), ([4, 5], [13, 14, 2], [22, 23, 24, 2])]


def tiny_policy():
    return tiny_llama()


def by_hand(model, batch, precision: str):
    """batch_logps under an explicit torch.autocast in `precision` (what accelerate should apply)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        return batch_logps(model, batch)


@pytest.fixture(params=["no", "bf16"])
def accelerator(request):
    """An Accelerator forced to one precision. Its state is process-wide, so it is reset around the test."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield Accelerator(mixed_precision=request.param, cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)


def test_reference_pass_and_one_update_equal_a_hand_computation_in_that_precision(accelerator):
    precision = accelerator.mixed_precision
    policy = tiny_policy()
    twin = copy.deepcopy(policy)
    batches = [collate_pairs([encode_pair(p, c, r, 32) for p, c, r in PAIRS], pad_id=0)]
    # The DPO term alone (rpo_alpha=0): its step-0 loss is exactly log 2 when the reference is the policy itself.
    cfg = DPOConfig(beta=0.5, learning_rate=1e-2, epochs=1, max_steps=1, batch_size=2, mixed_precision=precision,
                    rpo_alpha=0.0)

    # The reference pass: the same kernels on the same inputs as the hand computation.
    ref = reference_logps(policy, batches, accelerator)
    with torch.no_grad():
        hand = by_hand(twin, batches[0], precision)
        float32 = by_hand(twin, batches[0], "no")
    for got, want in zip(ref[0], hand):
        assert torch.allclose(got, want.float(), atol=1e-6, rtol=0), (got, want)
    gap = max((a - b.float()).abs().max().item() for a, b in zip(ref[0], float32))
    print(f"{precision}: max |reference - float32 reference| = {gap:.2e}")
    if precision == "bf16":
        assert gap > 1e-4  # bf16 really was in effect (8-bit mantissas change these sums visibly)
    else:
        assert gap < 1e-6

    # One step of train_round against the same step by hand: sigmoid DPO, clipping, AdamW.
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate)
    metrics = train_round(policy, optimizer, batches, ref, cfg, accelerator)
    twin.train()
    chosen, rejected = by_hand(twin, batches[0], precision)
    losses, _, _ = sigmoid_dpo_loss(chosen, rejected, *hand, beta=cfg.beta)
    losses.mean().backward()
    torch.nn.utils.clip_grad_norm_(twin.parameters(), cfg.max_grad_norm)
    hand_optimizer = torch.optim.AdamW(twin.parameters(), lr=cfg.learning_rate)
    hand_optimizer.step()
    # Step 0 compares the policy with itself in one precision: the log-ratio is 0 and the loss log 2.
    assert metrics[0]["loss"] == pytest.approx(losses.mean().item(), abs=1e-6)
    assert metrics[0]["loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-5)
    assert abs(metrics[0]["reward_margin"]) < 1e-5
    for (name, p), q in zip(policy.named_parameters(), twin.parameters()):
        assert torch.allclose(p, q, atol=1e-6, rtol=0), name
    assert any(not torch.equal(p, q) for p, q in zip(policy.parameters(), tiny_policy().parameters()))  # it moved


def test_attention_in_float32_runs_the_attention_of_a_bf16_update_in_float32(monkeypatch):
    """On a bf16 CPU the policy's attention runs in float32 (`attend_in_float32`): under bf16
    autocast the attention sees float32 inputs and the gradients flow, the same whether the
    backward recomputes it or not; without autocast the model computes exactly what plain SDPA
    does. A LoRA-wrapped model's base model switches."""
    import transformers.integrations.sdpa_attention as sdpa

    from online_dpo.config import LoRAConfig
    from online_dpo.train import lora
    from online_dpo.train.logps import FLOAT32_SDPA, attend_in_float32

    batch = collate_pairs([encode_pair(p, c, r, 32) for p, c, r in PAIRS], pad_id=0)
    plain, model = tiny_policy(), tiny_policy()
    attend_in_float32(model)
    assert model.config._attn_implementation == FLOAT32_SDPA and plain.config._attn_implementation == "sdpa"
    seen = []
    real = sdpa.sdpa_attention_forward
    monkeypatch.setattr(sdpa, "sdpa_attention_forward",
                        lambda m, q, k, v, *a, **kw: seen.append(q.dtype) or real(m, q, k, v, *a, **kw))
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(by_hand(model, batch, "no"), by_hand(plain, batch, "no")))
    seen.clear()
    chosen, rejected = by_hand(model, batch, "bf16")
    assert seen and set(seen) == {torch.float32}  # every layer's attention, in float32
    with torch.no_grad():
        expected = by_hand(plain, batch, "no")
    assert torch.allclose(chosen, expected[0], atol=0.05) and torch.allclose(rejected, expected[1], atol=0.05)
    (chosen - rejected).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    assert all(torch.isfinite(g).all() for g in grads)
    # The backward recomputes each layer's attention from its inputs (torch.utils.checkpoint): the
    # same gradients as an attention whose float32 tensors were kept from the forward
    kept = []
    monkeypatch.setattr("torch.utils.checkpoint.checkpoint", lambda fn, *args, **kw: kept.append(fn) or fn(*args))
    model.zero_grad()
    chosen, rejected = by_hand(model, batch, "bf16")
    (chosen - rejected).sum().backward()
    assert len(kept) == model.config.num_hidden_layers
    assert all(torch.allclose(p.grad, g, atol=1e-6) for p, g in zip(model.parameters(), grads))

    wrapped = lora.wrap_lora(tiny_policy(), LoRAConfig(enabled=True, target_modules=["q_proj", "v_proj"]))
    attend_in_float32(wrapped)
    assert wrapped.get_base_model().config._attn_implementation == FLOAT32_SDPA
