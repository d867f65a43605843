"""LoRA through `peft`: wrapping the policy, its full merged weights (for the vLLM weight
sync and the checkpoint), the base model as reference, and the adapter on disk.

The merged weights are computed from a state dict (W + scaling·B@A per adapted layer)
rather than by merging in place: the base weights stay untouched (merge then unmerge
would drift them in floating point), and it works on the full state dict that
`accelerator.get_state_dict` gathers under FSDP / DeepSpeed ZeRO-3.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from online_dpo.config import ConfigError, LoRAConfig

ADAPTER_DIR = "adapter"  # inside a round's checkpoint/: the LoRA adapter, for resume


def _unwrap(model):
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


def is_peft_model(model) -> bool:
    from peft import PeftModel

    return isinstance(_unwrap(model), PeftModel)


def wrap_lora(model, cfg: LoRAConfig, adapter_dir: str | Path | None = None):
    """The policy with trainable LoRA adapters (every base weight frozen).

    `adapter_dir`: an adapter saved by `save_adapter` (resume), loaded trainable; else a
    new adapter from `cfg` (B = 0, so the wrapped model starts equal to the base)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if adapter_dir is not None:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                        target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"lora.target_modules={list(cfg.target_modules)} does not fit this model ({e}); "
                          f"its linear layers are named: {linear}") from None


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, fan_in_fan_out: bool = False) -> torch.Tensor:
    """The weight change a LoRA adapter adds to one linear layer: scaling · B @ A, in float32.

    Args: lora_a A [r, in], lora_b B [out, r], scaling = alpha / r (peft's `scaling`),
    fan_in_fan_out: the base weight is stored [in, out] (GPT-2's Conv1D), so transpose.
    Returns [out, in] (or [in, out] with fan_in_fan_out)."""
    delta = (lora_b.float() @ lora_a.float()) * scaling
    return delta.T if fan_in_fan_out else delta


def merged_weights(model, state_dict: dict[str, torch.Tensor] | None = None) -> list[tuple[str, torch.Tensor]]:
    """The policy's full weights as (name, tensor) pairs under the plain HF names
    (`model.layers.0.self_attn.q_proj.weight`, ...), with the LoRA adapter merged in.

    Works for a plain model (its state dict as is) and a peft LoRA model (active adapter,
    linear layers). `state_dict`: the model's full state dict if it is not on this process
    whole (FSDP, ZeRO-3: `accelerator.get_state_dict(policy)`, called on every process);
    default `model.state_dict()`. Tensors are detached; tied weights stay shared."""
    model = _unwrap(model)
    sd = state_dict if state_dict is not None else model.state_dict()
    if not is_peft_model(model):
        return [(name, t.detach()) for name, t in sd.items()]
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    adapter = model.active_adapter
    merged: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if not isinstance(module, LoraLinear):
            raise NotImplementedError(f"merged_weights merges LoRA on linear layers only; {name} is a "
                                      f"{type(module).__name__}: remove it from lora.target_modules")
        if adapter not in module.lora_A:
            continue
        if module.use_dora.get(adapter):
            raise NotImplementedError(f"{name}: DoRA adapters are not supported by merged_weights")
        a_key, b_key = f"{name}.lora_A.{adapter}.weight", f"{name}.lora_B.{adapter}.weight"
        w_key = f"{name}.base_layer.weight"
        w = sd[w_key]
        merged[w_key] = (w.float() + lora_delta(sd[a_key], sd[b_key], module.scaling[adapter],
                                                module.fan_in_fan_out).to(w.device)).to(w.dtype)
        consumed |= {a_key, b_key}
    out = []
    for key, tensor in sd.items():
        if key in consumed:
            continue
        if ".lora_" in key:
            raise NotImplementedError(f"merged_weights cannot place the adapter weight {key} (a second adapter, "
                                      "or a LoRA variant other than plain linear LoRA)")
        out.append((plain_name(key), merged.get(key, tensor).detach()))
    return out


def plain_name(peft_key: str) -> str:
    """`base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight` -> `model.layers.0.self_attn.q_proj.weight`."""
    key = peft_key.removeprefix("base_model.model.")
    return key.replace(".base_layer.", ".")


@contextlib.contextmanager
def adapter_disabled(model):
    """Run `model` as its base (adapter off) inside the block: with LoRA the base weights
    never change, so under dpo.reference=initial they are the reference, with no second copy:

        with adapter_disabled(policy):
            ref = reference_logps(policy, batches, accelerator)
    """
    inner = _unwrap(model)
    if not is_peft_model(inner):
        raise ValueError("adapter_disabled needs a LoRA (peft) policy; without lora.enabled the initial "
                         "reference must be a separate frozen copy of the round-0 model")
    with inner.disable_adapter():
        yield


def save_adapter(model, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """The LoRA adapter alone (adapter_config.json + adapter_model.safetensors) -> `directory`.
    `state_dict`: as in `merged_weights` (FSDP / ZeRO-3). Returns `directory`."""
    _unwrap(model).save_pretrained(str(directory), state_dict=state_dict, safe_serialization=True)
    return Path(directory)


def save_merged(model, directory: str | Path, weights: list[tuple[str, torch.Tensor]] | None = None) -> Path:
    """A plain HF checkpoint (config + safetensors) of the merged policy -> `directory`,
    loadable with `AutoModelForCausalLM.from_pretrained` and by vLLM. `weights`: the merged
    weights when the caller has them already (`merged_weights` of a gathered state dict, under
    FSDP / ZeRO-3); else they are merged here. Returns `directory`."""
    inner = _unwrap(model)
    base = inner.get_base_model() if is_peft_model(inner) else inner
    merged = dict(weights if weights is not None else merged_weights(inner))
    base.save_pretrained(str(directory), state_dict=merged, safe_serialization=True)
    return Path(directory)
