"""Summed response log-probs of packed batches under a model: for the update, for the
reference pass, and from the generator's own per-token log-probs; and the attention the model
computes them with (its mask's form, float32 attention under bf16 autocast on a CPU).

Shapes: B = pairs in a batch, N = rows, T = row length, V = vocabulary.
"""

from __future__ import annotations

import math

import torch

from online_dpo.train.packing import PROMPT, ExampleBatch, PairBatch, Rows, shared_prompt_mask


def response_logps(logits: torch.Tensor, rows: Rows, start: int, segments: int) -> torch.Tensor:
    """Summed log-prob of each response of each row.

    Args: logits [N, T - start, V] for positions start..T-1 of `rows` (every predictor is
    >= start); segments: the responses per row (m). Returns [N, m].
    """
    logits = logits.float()
    src = (rows.predictor - start).clamp(min=0)  # [N, T]: where each token's logits are
    row = torch.arange(rows.num_rows, device=logits.device).unsqueeze(1)
    # picked - logsumexp: the token's log-prob without a second [N, T, V] log_softmax tensor
    token_logps = logits[row, src, rows.input_ids] - torch.logsumexp(logits, dim=-1).gather(1, src)  # [N, T]
    which = rows.segment.unsqueeze(-1) == torch.arange(1, segments + 1, device=logits.device)  # [N, T, m]
    return (token_logps.unsqueeze(-1) * which).sum(1)



FLOAT32_SDPA = "sdpa_float32"  # the name `attend_in_float32` registers with transformers


def float32_sdpa(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, **kwargs):
    """transformers' SDPA attention computed in float32 whatever autocast says, returned in the
    query's dtype. query [B, heads, T, head_dim], key and value [B, kv_heads, S, head_dim].
    Under autograd it keeps only its inputs, in their own dtype, for the backward, which computes
    the attention again (torch.utils.checkpoint): float32 copies kept for every layer would add
    a quarter of a GiB to an update's peak memory at the quickstart's sizes."""
    from torch.utils.checkpoint import checkpoint
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with torch.autocast(q.device.type, enabled=False):
            out, _ = sdpa_attention_forward(module, q.float(), k.float(), v.float(), attention_mask, **kwargs)
        return out.to(q.dtype)

    if torch.is_grad_enabled() and query.requires_grad:
        return checkpoint(attend, query, key, value, use_reentrant=False), None
    return attend(query, key, value), None


def attend_in_float32(model) -> None:
    """Compute `model`'s attention in float32 while its projections and MLP run under bf16
    autocast: on a CPU, torch's bf16 SDPA backward is several times slower than its float32 one
    at these sequence lengths (bench/README.md, "The update in bf16 on a CPU"). Only for a model
    on SDPA (the default); a LoRA-wrapped model's base model is switched."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "_attn_implementation", None) != "sdpa":
        return
    AttentionInterface.register(FLOAT32_SDPA, float32_sdpa)
    AttentionMaskInterface.register(FLOAT32_SDPA, sdpa_mask)
    base.set_attn_implementation(FLOAT32_SDPA)


def model_attention_mask(model, segment: torch.Tensor) -> torch.Tensor:
    """The shared-prompt mask in the form the model's attention takes: bool for SDPA (also in
    float32: `attend_in_float32`), additive (0 / most negative float) for eager attention. Other
    kernels (FlashAttention 2) take no 4-D mask."""
    config = getattr(model, "module", model).config  # DDP/FSDP wrap the model in .module
    impl = getattr(config, "_attn_implementation", None) or "sdpa"
    mask = shared_prompt_mask(segment)
    if impl in ("sdpa", FLOAT32_SDPA):
        return mask
    if impl == "eager":
        return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
    raise ValueError(f"the policy uses attn_implementation={impl!r}; the update's shared-prompt rows need a 4-D "
                     f"attention mask, which 'sdpa' (the default) and 'eager' take: load the policy with one of them")


def batch_logps(model, batch: PairBatch | ExampleBatch) -> tuple[torch.Tensor, ...]:
    """Summed response log-probs under `model`: (chosen [B], rejected [B]) for a PairBatch,
    (logps [N],) for an ExampleBatch."""
    rows = batch.rows
    # Logits only from the earliest predicting position on (the shortest prompt's last token):
    # the LM head and the [N, T, V] softmax over prompt positions would be thrown away.
    responses = rows.segment > PROMPT
    start = int(rows.predictor[responses].min()) if responses.any() else rows.input_ids.shape[1] - 1
    logits = model(input_ids=rows.input_ids, position_ids=rows.position_ids,
                   attention_mask=model_attention_mask(model, rows.segment), use_cache=False,
                   logits_to_keep=rows.input_ids.shape[1] - start).logits
    return batch.split(response_logps(logits, rows, start, batch.segments))


def response_token_counts(batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [B], rejected [B]) number of response tokens, at least 1: the tokens
    `batch_logps` sums, so sum / count is the per-token average."""
    counts = batch.rows.response_lengths(2).clamp(min=1)
    return counts[:, 0], counts[:, 1]


@torch.no_grad()
def reference_logps(model, batches: list[PairBatch] | list[ExampleBatch], accelerator) -> list[tuple[torch.Tensor, ...]]:
    """Reference log-probs for every batch, under `model` as it stands (before the update).

    Each process scores its share of every batch; the shares are gathered, so every
    process gets the full (chosen [B], rejected [B]) per pair batch, (logps [N],) per
    example batch, on the CPU."""
    model.eval()
    out = []
    for batch in batches:
        local = batch.shard(accelerator.process_index, accelerator.num_processes).to(accelerator.device)
        with accelerator.autocast():
            parts = batch_logps(model, local)
        # gather concatenates in process order, which is the rows' order (shards are contiguous).
        out.append(tuple(accelerator.gather(x.float().contiguous()).cpu() for x in parts))
    return out


def reference_from_generation(responses: list[tuple[list[float], ...]], rooms: list[int],
                               batch_size: int) -> list[tuple[torch.Tensor, ...]]:
    """Reference log-probs from the generator's per-token log-probs, in `reference_logps`' layout.

    responses[i]: for the i-th pair (example) in batch order, each response's per-token
    log-probs under the policy that sampled it: (chosen, rejected), or (completion,).
    rooms[i]: how many of its leading tokens the update scores (`response_room`; the rest are cut).
    Returns, per batch of `batch_size` items, one [B] float32 tensor per response: the sums
    log π(response[:room] | prompt) that a forward pass of that policy would give."""
    sums = [tuple(math.fsum(lps[:room]) for lps in item) for item, room in zip(responses, rooms, strict=True)]
    return [tuple(torch.tensor(column, dtype=torch.float32) for column in zip(*sums[i : i + batch_size]))
            for i in range(0, len(sums), batch_size)]

