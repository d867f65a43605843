"""Setting the policy up for the DPO update: gradient checkpointing, the optimizer over the
trainable parameters, its state across rounds (dpo.optimizer_state) and DeepSpeed's batch sizes.

The update loop itself is `train.update.train_round`; LoRA wrapping is `train/lora.py`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from online_dpo.config import DPOConfig

OPTIMIZER_FILE = "optimizer.pt"  # inside a round's checkpoint/ (dpo.optimizer_state=carry)


def enable_gradient_checkpointing(model) -> None:
    """Recompute each layer's activations during backward instead of keeping them: less
    memory, one more forward per layer of compute. Non-reentrant checkpointing, so it works with frozen
    inputs (LoRA) without `enable_input_require_grads`."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    """The parameters the update changes (with LoRA: only the adapters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the policy has no trainable parameters (every parameter has requires_grad=False)")
    return params


def build_optimizer(model, cfg: DPOConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only; the LR is set each round by `update.make_scheduler`.

    The fused implementation (one kernel over all parameters; CPU and CUDA) where torch has
    it for these parameters, since the per-tensor loop shows in the update's profile (see
    bench/). Same math, different rounding order."""
    params = trainable_parameters(model)
    try:
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True)
    except RuntimeError:  # a device or dtype the fused kernel does not support
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def reset_optimizer_state(optimizer) -> None:
    """dpo.optimizer_state=fresh: forget the AdamW moments and step counts before a round.

    Zeroed in place rather than dropped: AdamW starting from zero moments at step 0 is what a
    new optimizer does, and reusing the buffers keeps a second copy of the moments (2x the
    trainable weights) from being allocated while the old one is still held by the allocator."""
    for state in getattr(optimizer, "optimizer", optimizer).state.values():
        for value in state.values():
            if torch.is_tensor(value):
                value.zero_()


def _check_not_sharded(accelerator, what: str) -> None:
    from accelerate.utils import DistributedType

    if accelerator is not None and accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise NotImplementedError(
            f"{what}: dpo.optimizer_state=carry keeps one optimizer.pt, but under "
            f"{accelerator.distributed_type.value} each process holds only a shard of the optimizer state; "
            "use dpo.optimizer_state=fresh there (or DDP / one process)")


def save_optimizer_state(optimizer, directory: str | Path, accelerator=None) -> Path:
    """Write the optimizer's state (AdamW moments, step counts, param groups) to
    `directory`/optimizer.pt; call it on the main process (with DDP every process holds the
    same state). Returns the file's path."""
    _check_not_sharded(accelerator, "saving the optimizer state")
    path = Path(directory) / OPTIMIZER_FILE
    torch.save(getattr(optimizer, "optimizer", optimizer).state_dict(), path)
    return path


def load_optimizer_state(optimizer, directory: str | Path, accelerator=None) -> bool:
    """Load `directory`/optimizer.pt into `optimizer` (built the same way, over the same
    parameters, e.g. by `build_optimizer`); the tensors move to the parameters' device.
    Returns False (and changes nothing) when the checkpoint has no optimizer.pt."""
    _check_not_sharded(accelerator, "loading the optimizer state")
    path = Path(directory) / OPTIMIZER_FILE
    if not path.is_file():
        return False
    state = torch.load(path, map_location="cpu", weights_only=True)
    getattr(optimizer, "optimizer", optimizer).load_state_dict(state)
    return True


def configure_deepspeed(accelerator, cfg: DPOConfig) -> None:
    """Fill the DeepSpeed config fields accelerate cannot infer without a dataloader; call
    before `accelerator.prepare`. Each process runs batch_size / processes pairs per
    micro-batch; accumulation and clipping: `train_round` accumulates itself (telling
    the engine which micro-batch ends a step) and DeepSpeed clips at dpo.max_grad_norm."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = max(1, cfg.batch_size // accelerator.num_processes)
    ds["gradient_accumulation_steps"] = 1
    ds["gradient_clipping"] = cfg.max_grad_norm
    ds.pop("train_batch_size", None)  # DeepSpeed derives it from the two above
