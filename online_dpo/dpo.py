"""DPO: pure loss functions, the reference log-prob pass, and the per-round update loop.

Shapes: B = pairs in a batch, N = rows, T = row length, V = vocabulary.
The reference log-probs are computed once per round, before the update, with the
policy as it stands (or summed from the generator's own token log-probs, which are the
same numbers: `reference_from_generation`); so no second model is held in memory while training.

Several processes (accelerate: DDP, FSDP, DeepSpeed): every process builds the same
global batches from the same pairs; process i of n takes the i-th equal share of each
batch's pairs (`PairBatch.shard`), so the gradient DDP averages equals the one-process
full-batch gradient, and the metrics are averaged over processes so all ranks log the same.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from online_dpo.config import REFERENCE_FREE_LOSSES, UNPAIRED_LOSSES, DPOConfig, KTOConfig

log = logging.getLogger("online_dpo")


# --- pure math ------------------------------------------------------------------------

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


LOSSES = {"sigmoid": sigmoid_dpo_loss, "robust": robust_dpo_loss, "ipo": ipo_loss, "hinge": hinge_loss}
SMOOTHED = {"sigmoid", "robust"}  # the losses that take label_smoothing
SOFT_LABELLED = {"sigmoid"}  # the losses that take chosen_prob (kept ties)
# Reference-free losses: called on per-token average log-probs, with no reference at all.
REFERENCE_FREE = {"simpo": simpo_loss, "orpo": orpo_loss}
assert set(REFERENCE_FREE) == set(REFERENCE_FREE_LOSSES)


UNPAIRED = {"kto": kto_loss}  # trained on ExampleBatch (one response each), not PairBatch
assert set(UNPAIRED) == set(UNPAIRED_LOSSES)
ALL_LOSSES = sorted(LOSSES) + sorted(REFERENCE_FREE) + sorted(UNPAIRED)


def needs_reference(loss: str) -> bool:
    """Whether `dpo.loss=loss` compares the policy with a reference (so the round runs a reference pass)."""
    if loss not in ALL_LOSSES:
        raise ValueError(f"unknown dpo.loss {loss!r}; choose one of {ALL_LOSSES}")
    return loss not in REFERENCE_FREE


def is_unpaired(loss: str) -> bool:
    """Whether `dpo.loss=loss` trains on unpaired, labelled examples (KTO) instead of pairs."""
    needs_reference(loss)  # validates the name
    return loss in UNPAIRED


NLL_BY_DEFAULT = ("sigmoid", "robust", "ipo", "hinge")  # dpo.rpo_alpha=auto adds the chosen NLL to these


def nll_weight(cfg: DPOConfig) -> float:
    """dpo.rpo_alpha resolved: the weight of the chosen response's per-token NLL in the pair loss."""
    if cfg.rpo_alpha == "auto":
        return 1.0 if cfg.loss in NLL_BY_DEFAULT else 0.0
    return cfg.rpo_alpha


def make_loss_fn(cfg: DPOConfig, kto: KTOConfig | None = None):
    """The configured loss with its hyper-parameters bound. Reference-based losses take
    (policy_chosen, policy_rejected, ref_chosen, ref_rejected[, chosen_prob]) summed log-probs;
    reference-free ones take (policy_chosen_avg, policy_rejected_avg) per-token averages;
    kto takes (policy_logps, ref_logps, desirable, z0=...)."""
    if cfg.loss == "kto":
        kto = kto or KTOConfig()
        return functools.partial(kto_loss, beta=cfg.beta, desirable_weight=kto.desirable_weight,
                                 undesirable_weight=kto.undesirable_weight)
    if cfg.loss == "simpo":
        return functools.partial(simpo_loss, beta=cfg.beta, gamma=cfg.simpo_gamma)
    if cfg.loss == "orpo":
        return functools.partial(orpo_loss, lam=cfg.orpo_lambda)
    smoothing = {"label_smoothing": cfg.label_smoothing} if cfg.loss in SMOOTHED else {}
    return functools.partial(LOSSES[cfg.loss], beta=cfg.beta, **smoothing)


# --- batching -------------------------------------------------------------------------
#
# One row per pair holds its prompt once, then the chosen and then the rejected response:
#     [prompt | chosen | rejected | pad]
# Each response's position ids continue from the prompt's end, and the attention mask lets a
# response token see the prompt and the earlier tokens of its own response only. So each
# response gets exactly the log-probs of (prompt + response) run as a sequence of its own,
# while the prompt's forward and backward run once per pair instead of twice and a row pads
# only to the longest pair, not to the longest response twice (0.67x the tokens of two
# right-padded rows per pair on the quickstart's pairs). KTO's unpaired examples use the same
# rows with a single response.

PROMPT, PAD = 0, -1  # segment ids; the responses of a row are 1, 2, ...


@dataclass
class Rows:
    """Right-padded shared-prompt rows, each [N, T].

    input_ids; position_ids (a response's positions continue from its prompt's end);
    segment (PROMPT, 1..m for the row's responses, PAD); predictor: for each response token,
    the index of the position whose logits predict it (the previous token of its own
    response, or the prompt's last token for its first token); 0 elsewhere."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment: torch.Tensor
    predictor: torch.Tensor

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        """Tokens the model runs on (pads excluded): the prompt counts once per row."""
        return int((self.segment != PAD).sum())

    def response_lengths(self, segments: int) -> torch.Tensor:
        """[N, segments]: the number of tokens of each response."""
        ids = torch.arange(1, segments + 1, device=self.segment.device)
        return (self.segment.unsqueeze(-1) == ids).sum(1)

    def select(self, index) -> Rows:
        return Rows(self.input_ids[index], self.position_ids[index], self.segment[index], self.predictor[index])

    def to(self, device) -> Rows:
        return Rows(self.input_ids.to(device), self.position_ids.to(device), self.segment.to(device),
                    self.predictor.to(device))


def pack_rows(rows: list[tuple[list[int], list[list[int]]]], pad_id: int) -> Rows:
    """(prompt_ids, [response_ids, ...]) per row -> `Rows` [N, T], T = the longest row."""
    width = max(len(prompt) + sum(map(len, responses)) for prompt, responses in rows)
    shape = (len(rows), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    pos = torch.zeros(shape, dtype=torch.long)
    seg = torch.full(shape, PAD, dtype=torch.long)
    pred = torch.zeros(shape, dtype=torch.long)
    for i, (prompt, responses) in enumerate(rows):
        n = len(prompt)
        ids[i, :n], pos[i, :n], seg[i, :n] = torch.tensor(prompt), torch.arange(n), PROMPT
        at = n
        for s, response in enumerate(responses, start=1):
            k = len(response)
            if not k:
                continue
            ids[i, at:at + k] = torch.tensor(response)
            pos[i, at:at + k] = torch.arange(n, n + k)
            seg[i, at:at + k] = s
            pred[i, at:at + k] = torch.arange(at - 1, at + k - 1)
            pred[i, at] = n - 1  # every response's first token is predicted by the prompt's last
            at += k
    return Rows(ids, pos, seg, pred)


def shared_prompt_mask(segment: torch.Tensor) -> torch.Tensor:
    """[N, T] segments -> [N, 1, T, T] bool (True = may attend): query i sees key j iff j <= i
    and j is in the prompt or in i's own response. A pad sees the prompt and earlier pads, so
    no row of the mask is empty (an empty row would make the attention NaN), and no token
    outside the pads sees a pad."""
    width = segment.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segment.device).tril()
    query, key = segment.unsqueeze(2), segment.unsqueeze(1)
    return (causal & ((key == PROMPT) | (key == query))).unsqueeze(1)


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


def encode_pair(prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int], max_length: int):
    """(prompt, chosen, rejected) for one pair; each response is cut so that prompt + response
    fits `max_length` (the length each response is scored at)."""
    room = response_room(prompt_ids, max_length)
    return prompt_ids, chosen_ids[:room], rejected_ids[:room]


def response_room(prompt_ids: list[int], max_length: int) -> int:
    """How many response tokens fit after the prompt under `max_length` (at least 1, or an error)."""
    room = max_length - len(prompt_ids)
    if room < 1:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room under dpo.max_length={max_length}")
    return room


@dataclass
class PairBatch:
    """B pairs, one shared-prompt row each (`Rows`: segment 1 = chosen, 2 = rejected).
    chosen_prob [B]: the label of each pair (1.0 = chosen preferred, 0.5 = a kept tie)."""

    rows: Rows
    chosen_prob: torch.Tensor | None = None
    segments = 2

    def __post_init__(self):
        if self.chosen_prob is None:
            self.chosen_prob = torch.ones(self.num_pairs)

    @property
    def num_pairs(self) -> int:
        return self.rows.num_rows

    num_items = num_pairs  # what the update counts, weights and shards by

    def split(self, logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row values [B, 2] -> (chosen [B], rejected [B])."""
        return logps[:, 0], logps[:, 1]

    @property
    def has_soft_labels(self) -> bool:
        return bool((self.chosen_prob != 1).any())

    def to(self, device) -> PairBatch:
        return PairBatch(self.rows.to(device), self.chosen_prob.to(device))

    def shard(self, index: int, count: int) -> PairBatch:
        """Process `index` of `count`'s equal share of the pairs (contiguous, in order); the
        padded width is kept, so every process runs the same shapes."""
        lo, hi = shard_range(self.num_pairs, index, count)
        return PairBatch(self.rows.select(slice(lo, hi)), self.chosen_prob[lo:hi])


def shard_range(num_pairs: int, index: int, count: int) -> tuple[int, int]:
    """[lo, hi) of the pairs process `index` of `count` takes; the split must be even."""
    if num_pairs % count:
        raise ValueError(
            f"a batch of {num_pairs} pairs cannot be split evenly over {count} processes; "
            f"set dpo.batch_size to a multiple of {count} (and build batches with make_batches(..., num_processes={count}))")
    share = num_pairs // count
    return index * share, (index + 1) * share


def collate_pairs(encoded: list, pad_id: int, chosen_prob: list[float] | None = None) -> PairBatch:
    """`encoded`: (prompt_ids, chosen_ids, rejected_ids) per pair (`encode_pair`) -> PairBatch.
    `chosen_prob`: one label per pair (default 1.0 each)."""
    probs = torch.tensor(chosen_prob, dtype=torch.float32) if chosen_prob is not None else None
    return PairBatch(pack_rows([(p, [c, r]) for p, c, r in encoded], pad_id), probs)


@dataclass
class ExampleBatch:
    """Unpaired examples (KTO): one row per response (`Rows` with one response, segment 1);
    desirable [N] bool (the judge's label)."""

    rows: Rows
    desirable: torch.Tensor
    segments = 1

    @property
    def num_items(self) -> int:
        return self.rows.num_rows

    def split(self, logps: torch.Tensor) -> tuple[torch.Tensor]:
        return (logps[:, 0],)

    def to(self, device) -> ExampleBatch:
        return ExampleBatch(self.rows.to(device), self.desirable.to(device))

    def shard(self, index: int, count: int) -> ExampleBatch:
        """Process `index` of `count`'s equal, contiguous share of the examples (padded width kept)."""
        lo, hi = shard_range(self.num_items, index, count)
        return ExampleBatch(self.rows.select(slice(lo, hi)), self.desirable[lo:hi])


def make_example_batches(examples: list[dict], prompt_ids: dict[str, list[int]], cfg: DPOConfig, pad_id: int,
                         seed: int, num_processes: int = 1) -> list[ExampleBatch]:
    """Shuffle labelled examples with `seed` and cut them into batches of `cfg.batch_size`
    examples (the same order and the same even-split rule as `make_batches`)."""
    order = even_order(len(examples), cfg, seed, num_processes, "examples")
    rows, labels = [], []
    for i in order:
        prompt = prompt_ids[examples[i]["prompt_id"]]
        rows.append((prompt, [list(examples[i]["completion_token_ids"])[: response_room(prompt, cfg.max_length)]]))
        labels.append(bool(examples[i]["label"]))
    return [ExampleBatch(pack_rows(rows[i : i + cfg.batch_size], pad_id),
                         torch.tensor(labels[i : i + cfg.batch_size], dtype=torch.bool))
            for i in range(0, len(rows), cfg.batch_size)]


def model_attention_mask(model, segment: torch.Tensor) -> torch.Tensor:
    """The shared-prompt mask in the form the model's attention takes: bool for SDPA, additive
    (0 / most negative float) for eager attention. Other kernels (FlashAttention 2) take no 4-D mask."""
    config = getattr(model, "module", model).config  # DDP/FSDP wrap the model in .module
    impl = getattr(config, "_attn_implementation", None) or "sdpa"
    mask = shared_prompt_mask(segment)
    if impl == "sdpa":
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


def batch_order(num_pairs: int, seed: int, num_processes: int = 1) -> list[int]:
    """The pair indices in the order `make_batches` puts them in batches: a seeded shuffle,
    less the last (num_pairs % num_processes) so every batch splits evenly over processes."""
    order = torch.randperm(num_pairs, generator=torch.Generator().manual_seed(seed)).tolist()
    return order[: num_pairs - num_pairs % num_processes]


def even_order(count: int, cfg: DPOConfig, seed: int, num_processes: int, unit: str) -> list[int]:
    """`batch_order` after checking that dpo.batch_size splits over the processes; warns about
    the items (`unit`: "pairs" or "examples") left out so every batch splits evenly."""
    if cfg.batch_size % num_processes:
        raise ValueError(f"dpo.batch_size={cfg.batch_size} {unit} cannot be split evenly over {num_processes} "
                         f"processes; set dpo.batch_size to a multiple of {num_processes}")
    order = batch_order(count, seed, num_processes)
    if len(order) < count:
        log.warning("%d of %d %s left out of this update so they split evenly over %d processes",
                    count - len(order), count, unit, num_processes)
    return order


def make_batches(pairs: list[dict], prompt_ids: dict[str, list[int]], cfg: DPOConfig, pad_id: int, seed: int,
                 num_processes: int = 1) -> list[PairBatch]:
    """Shuffle pairs with `seed` and cut them into batches of `cfg.batch_size` pairs.

    A pair's `chosen_prob` (0.5 for a kept tie; missing means 1.0) travels with it.
    With several processes every batch must split evenly: `cfg.batch_size` must be a
    multiple of `num_processes`, and the last (num_pairs % num_processes) shuffled pairs
    are left out of this round, so the last, smaller batch splits too."""
    order = even_order(len(pairs), cfg, seed, num_processes, "pairs")
    encoded = [encode_pair(prompt_ids[pairs[i]["prompt_id"]], pairs[i]["chosen_token_ids"],
                           pairs[i]["rejected_token_ids"], cfg.max_length) for i in order]
    probs = [float(pairs[i].get("chosen_prob", 1.0)) for i in order]
    return [collate_pairs(encoded[i : i + cfg.batch_size], pad_id, probs[i : i + cfg.batch_size])
            for i in range(0, len(encoded), cfg.batch_size)]


# --- the passes -----------------------------------------------------------------------

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


SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def make_scheduler(optimizer, cfg: DPOConfig, total_steps: int, start_step: int = 0):
    """transformers' schedule: `cfg.warmup_steps` of linear warmup from 0, then constant, linear
    decay to 0 or cosine decay to 0 at `total_steps`, entered at `start_step`. A round's own
    schedule starts at 0 (restarting at `cfg.learning_rate` every round, also when the
    optimizer's moments are carried over); with dpo.lr_schedule_span=campaign, round r enters
    one schedule over all rounds at r x dpo.max_steps."""
    from torch.optim.lr_scheduler import LambdaLR
    from transformers import get_scheduler

    base = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper -> the torch optimizer
    for group in base.param_groups:
        group["lr"] = group["initial_lr"] = cfg.learning_rate
    schedule = get_scheduler(SCHEDULES[cfg.lr_schedule], base, num_warmup_steps=cfg.warmup_steps,
                             num_training_steps=total_steps)
    if start_step == 0:
        return schedule
    multiplier = schedule.lr_lambdas[0]  # LR / cfg.learning_rate at a step of the whole schedule
    return LambdaLR(base, lambda step: multiplier(start_step + step))


def accumulation_groups(num_batches: int, grad_accum_steps: int) -> list[list[int]]:
    """Batch indices of each optimizer step in one epoch; the last group may be shorter."""
    return [list(range(i, min(i + grad_accum_steps, num_batches))) for i in range(0, num_batches, grad_accum_steps)]


@contextlib.contextmanager
def gradient_sync(accelerator, model, sync: bool):
    """Backward without syncing gradients across processes unless `sync` (the last micro-batch
    of an accumulation group): DDP/FSDP skip the all-reduce (`no_sync`), and DeepSpeed,
    whose `backward` steps the engine itself, reads accelerate's sync flag. That flag has
    no public setter outside `accumulate()`, whose fixed-count grouping cannot end a
    shorter last group; so it is set here and always left True."""
    from accelerate.utils import DistributedType

    if sync or accelerator.distributed_type == DistributedType.NO:
        yield
        return
    accelerator.gradient_state._set_sync_gradients(False)
    try:
        with accelerator.no_sync(model):
            yield
    finally:
        accelerator.gradient_state._set_sync_gradients(True)


PAIR_METRICS = ("loss", "reward_margin", "pair_accuracy", "chosen_logps", "rejected_logps",
                "chosen_reward", "rejected_reward", "kl")
KTO_METRICS = ("loss", "desirable_reward", "undesirable_reward", "desirable_logps", "undesirable_logps",
               "kl", "kto_z0")  # + reward_margin = desirable_reward - undesirable_reward


def metric_names(loss: str) -> tuple[str, ...]:
    """The per-step metrics `train_round` accumulates for `loss` (reference-free: no kl)."""
    if is_unpaired(loss):
        return KTO_METRICS
    return PAIR_METRICS if needs_reference(loss) else PAIR_METRICS[:-1]


def pair_step_sums(loss_fn, cfg: DPOConfig, local: PairBatch, policy: tuple, ref: tuple | None, soft):
    """One pair micro-batch: (mean loss 0-dim, {metric: (sum, count)} over its pairs)."""
    pol_c, pol_r = policy
    if ref is None:  # reference-free: per-token averages
        count_c, count_r = response_token_counts(local)
        losses, rew_c, rew_r = loss_fn(pol_c / count_c, pol_r / count_r)
    else:
        extra = {"chosen_prob": soft} if soft is not None else {}
        losses, rew_c, rew_r = loss_fn(pol_c, pol_r, *ref, **extra)
    alpha = nll_weight(cfg)
    if alpha > 0:
        losses = losses + alpha * chosen_nll(pol_c, response_token_counts(local)[0])
    n = local.num_pairs
    sums = {"loss": losses.detach().sum(), "reward_margin": (rew_c - rew_r).sum(),
            "pair_accuracy": (rew_c > rew_r).float().sum(), "chosen_logps": pol_c.detach().sum(),
            "rejected_logps": pol_r.detach().sum(), "chosen_reward": rew_c.sum(), "rejected_reward": rew_r.sum()}
    if ref is not None:
        sums["kl"] = kl_to_reference(pol_c, pol_r, *ref) * n
    return losses.mean(), {k: (v, n) for k, v in sums.items()}


def kto_step_sums(loss_fn, local: ExampleBatch, policy: tuple, ref: tuple, accelerator):
    """One example micro-batch: (mean loss 0-dim, {metric: (sum, count)}). z0 is estimated over
    the whole global batch (the processes' estimates averaged), so it does not depend on how
    many processes share the batch."""
    (pol,), (ref_logps,) = policy, ref
    z0 = kto_reference_point(pol, ref_logps)
    if accelerator.num_processes > 1:  # equal shares: the mean of the means is the batch mean
        z0 = accelerator.reduce((pol - ref_logps).detach().mean(), reduction="mean").clamp(min=0)
    losses, reward, z0 = loss_fn(pol, ref_logps, local.desirable, z0=z0)
    good = local.desirable.to(torch.bool)
    n, n_good = local.num_items, int(good.sum())
    sums = {"loss": (losses.detach().sum(), n),
            "desirable_reward": (reward[good].sum(), n_good), "undesirable_reward": (reward[~good].sum(), n - n_good),
            "desirable_logps": (pol.detach()[good].sum(), n_good), "undesirable_logps": (pol.detach()[~good].sum(), n - n_good),
            "kl": ((ref_logps - pol).detach().sum(), n), "kto_z0": (z0 * n, n)}
    return losses.mean(), sums


def train_round(model, optimizer, batches: list[PairBatch] | list[ExampleBatch], ref: list | None, cfg: DPOConfig,
                accelerator, progress=None, kto: KTOConfig | None = None,
                schedule_rounds: tuple[int, int] = (0, 1)) -> list[dict]:
    """Run the round's update in place on `model`; returns one metrics dict per optimizer step.

    `batches` and `ref` are the global ones (the same on every process, see `make_batches`
    and `reference_logps`); each process trains on its share of every batch. Pair losses
    take PairBatch; dpo.loss=kto takes ExampleBatch (`make_example_batches`) and `kto`'s
    weights. `ref` is ignored, and may be None, for a reference-free loss (`needs_reference`),
    which is fed per-token average log-probs instead of sums. Each optimizer step accumulates
    `cfg.grad_accum_steps` batches, each weighted by its share of the group's pairs
    (examples), so accumulation gives the gradient of the mean loss over the group.
    The LR follows `make_scheduler`; `schedule_rounds` = (this round, rounds) places the round in
    the campaign's schedule with dpo.lr_schedule_span=campaign. The logged `lr` is the one that step used. The
    optimizer's state is left as it is: clearing it between rounds is the caller's choice.

    Metrics (averaged over the step's pairs or examples, all processes; `metric_names`):
    pairs: loss, reward_margin, pair_accuracy, chosen/rejected_logps, chosen/rejected_reward
    (beta·(policy - ref)), kl (see `kl_to_reference`); reference-free losses: the rewards are
    the loss's own (SimPO β·average log-prob, ORPO log odds), reward_margin their difference,
    and no kl. KTO: loss, desirable/undesirable_reward and _logps (means over each kind),
    reward_margin (their difference), kl (mean reference - policy log-prob), kto_z0. All: grad_norm
    (before clipping), lr, train_tokens_per_s (all processes together). They describe the
    policy before that step's update.
    """
    if not batches:
        return []
    unpaired = is_unpaired(cfg.loss)
    if unpaired != isinstance(batches[0], ExampleBatch):
        raise ValueError(f"dpo.loss={cfg.loss} trains on {'ExampleBatch' if unpaired else 'PairBatch'}es "
                         f"(make_{'example_' if unpaired else ''}batches), got {type(batches[0]).__name__}")
    if not unpaired and cfg.loss not in SOFT_LABELLED and any(b.has_soft_labels for b in batches):
        raise ValueError(f"pairs with chosen_prob != 1 (ties kept by pairs.drop_ties=false) need dpo.loss=sigmoid, "
                         f"not {cfg.loss}; set dpo.loss=sigmoid or pairs.drop_ties=true")
    reference_free = not needs_reference(cfg.loss)
    if not reference_free and ref is None:
        raise ValueError(f"dpo.loss={cfg.loss} needs reference log-probs (see reference_logps); got ref=None")
    loss_fn = make_loss_fn(cfg, kto)
    names = metric_names(cfg.loss)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    groups = accumulation_groups(len(batches), cfg.grad_accum_steps)
    total_steps = len(groups) * cfg.epochs if cfg.max_steps < 0 else cfg.max_steps
    if cfg.lr_schedule_span == "campaign":  # one schedule over every round: enter it where this round starts
        scheduler = make_scheduler(optimizer, cfg, schedule_rounds[1] * total_steps, schedule_rounds[0] * total_steps)
    else:
        scheduler = make_scheduler(optimizer, cfg, total_steps)
    model.train()
    metrics = []
    t0, tokens = time.perf_counter(), 0
    for step in range(total_steps):
        group = groups[step % len(groups)]
        group_items = sum(batches[i].num_items for i in group)
        # per metric: [sum, count] over this step's local pairs/examples; reduced over processes below
        totals = torch.zeros(2, len(names), dtype=torch.float64, device=device)
        for j, i in enumerate(group):
            batch = batches[i]
            local = batch.shard(rank, world)
            soft = local.chosen_prob.to(device) if not unpaired and batch.has_soft_labels else None  # None: hard labels
            local = local.to(device)
            lo, hi = shard_range(batch.num_items, rank, world)
            local_ref = None if reference_free else tuple(r[lo:hi].to(device) for r in ref[i])
            with gradient_sync(accelerator, model, sync=j == len(group) - 1):
                with accelerator.autocast():
                    policy = batch_logps(model, local)
                if unpaired:
                    loss, sums = kto_step_sums(loss_fn, local, policy, local_ref, accelerator)
                else:
                    loss, sums = pair_step_sums(loss_fn, cfg, local, policy, local_ref, soft)
                # this batch's share of the group's items (== 1/grad_accum_steps for equal batches)
                accelerator.backward(loss / (group_items / batch.num_items))
            for k, name in enumerate(names):
                value, count = sums[name]
                totals[0, k] += float(value)
                totals[1, k] += count
            tokens += local.rows.num_tokens
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            totals = accelerator.reduce(totals, reduction="sum")
        all_tokens = accelerator.reduce(torch.tensor(float(tokens), dtype=torch.float64, device=device), reduction="sum").item() if world > 1 else tokens
        means = {name: (s / n if n else float("nan")) for name, s, n in zip(names, *totals.tolist(), strict=True)}
        if unpaired:
            means["reward_margin"] = means["desirable_reward"] - means["undesirable_reward"]
        elapsed = time.perf_counter() - t0
        metrics.append({"step": step, **means,
                        "grad_norm": float("nan") if grad_norm is None else float(grad_norm), "lr": lr,
                        "train_tokens_per_s": all_tokens / elapsed if elapsed else 0.0})
        if progress is not None:
            progress(metrics[-1])
    model.eval()
    return metrics
