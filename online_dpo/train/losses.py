"""The DPO family as pure functions of summed (or per-token average) response log-probs,
and the explicit dispatch from a `LossType` to its function.

Shapes: B = pairs in a batch, N = unpaired examples. Every loss returns per-item values; the
update averages them.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from online_dpo.config.loss_type import LossType


def preference_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> torch.Tensor:
    """(Δpolicy - Δref) per pair: how much more the policy prefers chosen than the reference does. [B]"""
    return (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)


def implicit_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """beta * (policy - reference) log-prob for chosen and rejected, detached: ([B], [B])."""
    return beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()


def soft_label(chosen_prob: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Effective probability that `chosen` is preferred: p(1-ε) + (1-p)ε.

    chosen_prob p [B]: 1.0 for a judged preference, 0.5 for a kept tie. ε: the label
    smoothing (conservative DPO's flip rate). A tie stays 0.5 whatever ε is. Returns [B]."""
    return chosen_prob * (1 - label_smoothing) + (1 - chosen_prob) * label_smoothing


def sigmoid_dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
    chosen_prob: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standard DPO (Rafailov et al. 2023): -log sigmoid(beta * (Δpolicy - Δref)).

    With `label_smoothing` ε > 0 it is conservative DPO: each label is taken to be flipped
    with probability ε, so the loss mixes in ε of the reversed preference.
    With `chosen_prob` p [B] (soft labels, e.g. 0.5 for a kept tie) it is the binary
    cross-entropy against p_eff = p(1-ε) + (1-p)ε:
    -(p_eff·log σ(x) + (1-p_eff)·log σ(-x)); a tie is trained toward x = 0, "equally good".
    Args: summed response log-probs, each [B].
    Returns: (loss [B], chosen_reward [B], rejected_reward [B]) where the implicit
    rewards are beta * (policy - reference) log-prob, detached.
    """
    x = beta * preference_logits(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = -F.logsigmoid(x)
    if chosen_prob is not None:
        p = soft_label(chosen_prob.to(x.dtype), label_smoothing)
        losses = p * losses + (1 - p) * -F.logsigmoid(-x)
    elif label_smoothing > 0:  # only then: keeps ε = 0 bit-identical to plain DPO
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


def kl_to_reference(policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> torch.Tensor:
    """Sequence-level KL estimate between the reference and the policy: a scalar.

    mean over the 2B responses (chosen and rejected) of (reference - policy) summed
    log-prob, i.e. the plain Monte-Carlo ("k1") estimator of KL(π_ref ‖ π_θ) =
    E_{y~π_ref}[log π_ref(y) - log π_θ(y)]. It is unbiased only for samples of π_ref;
    here the responses were sampled by the round-start policy (then picked as chosen /
    rejected by the judge). So with dpo.reference=refreshed (reference = round-start
    policy) it estimates KL(π_ref ‖ π_θ) up to that selection: 0 before the first step,
    growing as the update moves away. With dpo.reference=initial it estimates
    KL(π_start ‖ π_θ) - KL(π_start ‖ π_ref), which can be negative.
    Equal to -(chosen_reward + rejected_reward) / (2·beta) averaged over pairs.
    Args: summed response log-probs, each [B]. Returns a 0-dim tensor.
    """
    return torch.cat([ref_chosen - policy_chosen, ref_rejected - policy_rejected]).detach().mean()


def logp_drift(before: list[tuple[torch.Tensor, ...]], after: list[tuple[torch.Tensor, ...]]) -> tuple[float, ...]:
    """How far an update moved each kind of response's log-likelihood, in nats.

    before, after: per batch, one [B] tensor of summed response log-probs per response kind
    ((chosen, rejected) for pairs), under the round's reference (the round-start policy, or
    the initial model with dpo.reference=initial) and under the updated policy.
    Returns, per kind, the mean over all responses of (after - before). A negative chosen
    drift is likelihood displacement: the update pushed the preferred responses down too."""
    kinds = len(before[0]) if before else 0
    return tuple(torch.cat([a[k] - b[k] for b, a in zip(before, after, strict=True)]).mean().item()
                 for k in range(kinds))


# --- reference-free and unpaired losses (take per-token average log-probs, not sums) ----

def simpo_loss(policy_chosen_avg: torch.Tensor, policy_rejected_avg: torch.Tensor, beta: float, gamma: float):
    """SimPO (Meng et al. 2024): -log σ(β·(avg_chosen - avg_rejected) - γ), reference-free.

    The implicit reward is β × the per-token average log-prob (length-normalized, so longer
    responses are not favoured); γ is the target reward margin. Because the log-probs are
    averages, β is typically much larger than DPO's (the paper uses 2.0-2.5).
    Args: per-token average response log-probs, each [B].
    Returns: (loss [B], chosen_reward [B], rejected_reward [B]), rewards = β·avg log-prob, detached.
    """
    chosen_reward, rejected_reward = beta * policy_chosen_avg, beta * policy_rejected_avg
    losses = -F.logsigmoid(chosen_reward - rejected_reward - gamma)
    return losses, chosen_reward.detach(), rejected_reward.detach()


def log_odds(avg_logp: torch.Tensor, max_logp: float = -1e-6) -> torch.Tensor:
    """log(p / (1 - p)) for p = exp(avg_logp), computed in log space. [B] -> [B].

    log(1 - p) = log(-expm1(x)), exact also for x near 0 where 1 - exp(x) would cancel;
    x is clamped to <= `max_logp` so p = 1 (an average log-prob of 0) gives a large finite
    value instead of inf (no gradient flows through the clamp there)."""
    x = avg_logp.clamp(max=max_logp)
    return x - torch.log(-torch.expm1(x))


def orpo_loss(policy_chosen_avg: torch.Tensor, policy_rejected_avg: torch.Tensor, lam: float):
    """ORPO (Hong et al. 2024): NLL of the chosen response + λ·(-log σ(log odds_chosen - log odds_rejected)),
    with odds = p / (1 - p), p = exp(per-token average log-prob); reference-free, no β.

    Args: per-token average response log-probs, each [B].
    Returns: (loss [B], chosen_reward [B], rejected_reward [B]); the "rewards" are the log
    odds, detached, so their difference is the log odds ratio the loss pushes up.
    """
    odds_chosen, odds_rejected = log_odds(policy_chosen_avg), log_odds(policy_rejected_avg)
    losses = -policy_chosen_avg + lam * -F.logsigmoid(odds_chosen - odds_rejected)
    return losses, odds_chosen.detach(), odds_rejected.detach()


def kto_reference_point(policy_logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0: the batch's estimate of KL(π_θ ‖ π_ref), mean(policy - reference)
    log-prob, clamped at 0 and detached (no gradient flows through it). [N], [N] -> 0-dim.

    The paper estimates it on mismatched prompt/response pairs; the batch mean over the
    matched examples is the simpler variant (the samples come from the round-start policy,
    so it is near 0 at the start of the update and grows as the policy moves)."""
    return (policy_logps - ref_logps).detach().mean().clamp(min=0)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    z0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024) on unpaired examples: each response is desirable or not.

    r = policy - reference log-prob; z0 = the reference point (`kto_reference_point` of this
    batch unless given, e.g. averaged over processes). The loss is
    λ_D·(1 - σ(β(r - z0))) for a desirable response, λ_U·(1 - σ(β(z0 - r))) for an undesirable one.
    Args: summed response log-probs policy_logps [N], ref_logps [N]; desirable [N] bool.
    Returns: (loss [N], reward [N] = β·r detached, z0 0-dim).
    """
    r = policy_logps - ref_logps
    if z0 is None:
        z0 = kto_reference_point(policy_logps, ref_logps)
    desirable = desirable.to(torch.bool)
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))))
    return losses, beta * r.detach(), z0


def make_loss_fn(loss: LossType, *, beta: float, label_smoothing: float = 0.0, simpo_gamma: float = 0.5,
                 orpo_lambda: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """`loss` with its hyper-parameters bound. Reference-based pair losses take
    (policy_chosen, policy_rejected, ref_chosen, ref_rejected[, chosen_prob]) summed log-probs;
    reference-free ones take (policy_chosen_avg, policy_rejected_avg) per-token averages;
    kto takes (policy_logps, ref_logps, desirable, z0=...)."""
    match loss:
        case LossType.SIGMOID:
            return functools.partial(sigmoid_dpo_loss, beta=beta, label_smoothing=label_smoothing)
        case LossType.ROBUST:
            return functools.partial(robust_dpo_loss, beta=beta, label_smoothing=label_smoothing)
        case LossType.IPO:
            return functools.partial(ipo_loss, beta=beta)
        case LossType.HINGE:
            return functools.partial(hinge_loss, beta=beta)
        case LossType.SIMPO:
            return functools.partial(simpo_loss, beta=beta, gamma=simpo_gamma)
        case LossType.ORPO:
            return functools.partial(orpo_loss, lam=orpo_lambda)
        case LossType.KTO:
            return functools.partial(kto_loss, beta=beta, desirable_weight=desirable_weight,
                                     undesirable_weight=undesirable_weight)
    raise ValueError(f"no loss function for {loss!r}")
