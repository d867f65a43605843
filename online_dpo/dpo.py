"""DPO: pure loss functions, the reference log-prob pass, and the per-round update loop.

Shapes: B = pairs in a batch, T = sequence length, V = vocabulary.
The reference log-probs are computed once per round, before the update, with the
policy as it stands; so no second model is held in memory while training.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from online_dpo.config import DPOConfig


# --- pure math ------------------------------------------------------------------------

def preference_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> torch.Tensor:
    """(Δpolicy - Δref) per pair: how much more the policy prefers chosen than the reference does. [B]"""
    return (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)


def implicit_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """beta * (policy - reference) log-prob for chosen and rejected, detached: ([B], [B])."""
    return beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()


def sigmoid_dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standard DPO (Rafailov et al. 2023): -log sigmoid(beta * (Δpolicy - Δref)).

    With `label_smoothing` ε > 0 it is conservative DPO: each label is taken to be flipped
    with probability ε, so the loss mixes in ε of the reversed preference.
    Args: summed response log-probs, each [B].
    Returns: (loss [B], chosen_reward [B], rejected_reward [B]) where the implicit
    rewards are beta * (policy - reference) log-prob, detached.
    """
    x = beta * preference_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = -F.logsigmoid(x)
    if label_smoothing > 0:  # only then: keeps ε = 0 bit-identical to plain DPO
        losses = (1 - label_smoothing) * losses + label_smoothing * -F.logsigmoid(-x)
    return (losses, *implicit_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta))


def robust_dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, label_smoothing: float = 0.1):
    """Robust DPO (Chowdhury et al. 2024): an unbiased loss under preference noise rate ε,
    [(1-ε)·ℓ(x) - ε·ℓ(-x)] / (1-2ε) with ℓ(x) = -log sigmoid(x), x = beta·(Δpolicy - Δref). Shapes as above."""
    eps = label_smoothing
    x = beta * preference_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = ((1 - eps) * -F.logsigmoid(x) - eps * -F.logsigmoid(-x)) / (1 - 2 * eps)
    return (losses, *implicit_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta))


def ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """IPO (Azar et al. 2023): (Δpolicy - Δref - 1/(2·beta))², a squared loss that does not
    push the margin to infinity on deterministic preferences. Shapes as above."""
    logits = preference_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = (logits - 1 / (2 * beta)) ** 2
    return (losses, *implicit_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta))


def hinge_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """Hinge (SLiC, Zhao et al. 2023): max(0, 1 - beta·(Δpolicy - Δref)). Shapes as above."""
    logits = preference_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = torch.relu(1 - beta * logits)
    return (losses, *implicit_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta))


def chosen_nll(policy_chosen: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood of the chosen response (the NLL term of iterative RPO).
    Args: summed log-probs [B], response token counts [B]. Returns [B]."""
    return -policy_chosen / chosen_tokens.clamp(min=1)


LOSSES = {"sigmoid": sigmoid_dpo_loss, "robust": robust_dpo_loss, "ipo": ipo_loss, "hinge": hinge_loss}
SMOOTHED = {"sigmoid", "robust"}  # the losses that take label_smoothing


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed log-prob of the labelled tokens of each sequence.

    Args: logits [N, T, V] (position t predicts token t+1), labels [N, T], mask [N, T]
    (1 on response tokens, aligned with labels). Returns [N].
    """
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    m = mask[:, 1:].to(logits.dtype)
    # gather - logsumexp avoids materialising a second [N, T, V] log_softmax tensor.
    picked = torch.gather(logits, 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    token_logps = picked - torch.logsumexp(logits, dim=-1)
    return (token_logps * m).sum(-1)


# --- batching -------------------------------------------------------------------------

@dataclass
class PairBatch:
    """Chosen rows first, then rejected rows: input_ids/attention/response_mask are [2B, T]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    def to(self, device) -> "PairBatch":
        return PairBatch(self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device))


def encode_pair(prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int], max_length: int):
    """Token rows for one pair; responses are cut so prompt + response fits `max_length`."""
    room = max_length - len(prompt_ids)
    if room < 1:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room under dpo.max_length={max_length}")
    return [(prompt_ids, ids[:room]) for ids in (chosen_ids, rejected_ids)]


def collate_pairs(encoded: list, pad_id: int) -> PairBatch:
    """`encoded`: list of [(prompt_ids, chosen_ids), (prompt_ids, rejected_ids)] -> right-padded PairBatch."""
    rows = [e[0] for e in encoded] + [e[1] for e in encoded]
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    resp = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r)
        attn[i, :n] = 1
        resp[i, len(p):n] = 1
    return PairBatch(ids, attn, resp)


def batch_logps(model, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [B], rejected [B]) summed response log-probs under `model`."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logps = sequence_logps(logits, batch.input_ids, batch.response_mask)
    return logps[: batch.num_pairs], logps[batch.num_pairs :]


# --- the passes -----------------------------------------------------------------------

@torch.no_grad()
def reference_logps(model, batches: list[PairBatch], accelerator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Reference log-probs for every batch, under the policy as it stands (before the update)."""
    model.eval()
    out = []
    for batch in batches:
        with accelerator.autocast():
            chosen, rejected = batch_logps(model, batch.to(accelerator.device))
        out.append((chosen.float().cpu(), rejected.float().cpu()))
    return out


def make_batches(pairs: list[dict], prompt_ids: dict[str, list[int]], cfg: DPOConfig, pad_id: int, seed: int) -> list[PairBatch]:
    """Shuffle pairs with `seed` and cut them into batches of `cfg.batch_size` pairs."""
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    encoded = [encode_pair(prompt_ids[pairs[i]["prompt_id"]], pairs[i]["chosen_token_ids"],
                           pairs[i]["rejected_token_ids"], cfg.max_length) for i in order]
    return [collate_pairs(encoded[i : i + cfg.batch_size], pad_id) for i in range(0, len(encoded), cfg.batch_size)]


def lr_at(step: int, cfg: DPOConfig) -> float:
    """Linear warmup, then constant."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    return cfg.learning_rate


def train_round(model, optimizer, batches: list[PairBatch], ref: list, cfg: DPOConfig, accelerator, progress=None) -> list[dict]:
    """Run the round's DPO update in place on `model`; returns one metrics dict per optimizer step."""
    smoothing = {"label_smoothing": cfg.label_smoothing} if cfg.loss in SMOOTHED else {}
    loss_fn = functools.partial(LOSSES[cfg.loss], beta=cfg.beta, **smoothing)
    model.train()
    steps_per_epoch = math.ceil(len(batches) / cfg.grad_accum_steps)
    total_steps = steps_per_epoch * cfg.epochs if cfg.max_steps < 0 else cfg.max_steps
    metrics, step, micro = [], 0, 0
    acc: dict[str, float] = {}
    t0 = time.perf_counter()
    tokens = 0
    while step < total_steps:
        for batch, (ref_c, ref_r) in zip(batches, ref):
            batch = batch.to(accelerator.device)
            with accelerator.autocast():
                pol_c, pol_r = batch_logps(model, batch)
            losses, rew_c, rew_r = loss_fn(pol_c, pol_r, ref_c.to(pol_c.device), ref_r.to(pol_c.device))
            if cfg.rpo_alpha > 0:
                losses = losses + cfg.rpo_alpha * chosen_nll(pol_c, batch.response_mask[: batch.num_pairs].sum(-1))
            loss = losses.mean()
            accelerator.backward(loss / cfg.grad_accum_steps)
            tokens += int(batch.attention_mask.sum())
            for k, v in {"loss": loss.item(), "reward_margin": (rew_c - rew_r).mean().item(),
                         "pair_accuracy": (rew_c > rew_r).float().mean().item(),
                         "chosen_logps": pol_c.mean().item(), "rejected_logps": pol_r.mean().item()}.items():
                acc[k] = acc.get(k, 0.0) + v / cfg.grad_accum_steps
            micro += 1
            if micro % cfg.grad_accum_steps and micro != len(batches):
                continue
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - t0
            metrics.append({"step": step, **acc, "grad_norm": float(grad_norm), "lr": lr_at(step, cfg),
                            "train_tokens_per_s": tokens / elapsed if elapsed else 0.0})
            acc = {}
            step += 1
            if progress is not None:
                progress(metrics[-1])
            if step >= total_steps:
                break
        micro = 0
    model.eval()
    return metrics
