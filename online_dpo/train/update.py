"""The per-round update loop (`train_round`): its LR schedule, gradient accumulation across
processes, and the metrics of each optimizer step.

Several processes (accelerate: DDP, FSDP, DeepSpeed): every process builds the same global
batches from the same pairs; process i of n takes the i-th equal share of each batch's pairs
(`PairBatch.shard`), so the gradient DDP averages equals the one-process full-batch gradient,
and the metrics are averaged over processes so all ranks log the same.
"""

from __future__ import annotations

import contextlib
import time

import torch

from online_dpo.config import DPOConfig, KTOConfig
from online_dpo.config.loss_type import LossType
from online_dpo.train.logps import batch_logps, response_token_counts
from online_dpo.train.losses import chosen_nll, kl_to_reference, kto_reference_point, make_loss_fn
from online_dpo.train.packing import ExampleBatch, PairBatch, shard_range


def nll_weight(cfg: DPOConfig) -> float:
    """dpo.rpo_alpha resolved: the weight of the chosen response's per-token NLL in the pair loss."""
    if cfg.rpo_alpha == "auto":
        return 1.0 if LossType(cfg.loss).nll_by_default else 0.0
    return cfg.rpo_alpha


def loss_fn_from_config(cfg: DPOConfig, kto: KTOConfig | None = None):
    """The builder from the dpo (and kto) sections to `make_loss_fn`'s arguments."""
    kto = kto or KTOConfig()
    return make_loss_fn(LossType(cfg.loss), beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                        simpo_gamma=cfg.simpo_gamma, orpo_lambda=cfg.orpo_lambda,
                        desirable_weight=kto.desirable_weight, undesirable_weight=kto.undesirable_weight)


SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def make_scheduler(optimizer, *, learning_rate: float, schedule: str, warmup_steps: int, total_steps: int,
                   start_step: int = 0):
    """transformers' schedule: `warmup_steps` of linear warmup from 0, then constant, linear
    decay to 0 or cosine decay to 0 at `total_steps` (`schedule`: a key of SCHEDULES), entered at
    `start_step`. A round's own schedule starts at 0 (restarting at `learning_rate` every round, also when the
    optimizer's moments are carried over); with dpo.lr_schedule_span=campaign, round r enters
    one schedule over all rounds at r x dpo.max_steps."""
    from torch.optim.lr_scheduler import LambdaLR
    from transformers import get_scheduler

    base = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper -> the torch optimizer
    for group in base.param_groups:
        group["lr"] = group["initial_lr"] = learning_rate
    scheduler = get_scheduler(SCHEDULES[schedule], base, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
    if start_step == 0:
        return scheduler
    multiplier = scheduler.lr_lambdas[0]  # LR / learning_rate at a step of the whole schedule
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
    loss = LossType(loss)
    if loss.unpaired:
        return KTO_METRICS
    return PAIR_METRICS if loss.needs_reference else PAIR_METRICS[:-1]


def pair_step_sums(loss_fn, nll_alpha: float, local: PairBatch, policy: tuple, ref: tuple | None, soft):
    """One pair micro-batch: (mean loss 0-dim, {metric: (sum, count)} over its pairs)."""
    pol_c, pol_r = policy
    if ref is None:  # reference-free: per-token averages
        count_c, count_r = response_token_counts(local)
        losses, rew_c, rew_r = loss_fn(pol_c / count_c, pol_r / count_r)
    else:
        extra = {"chosen_prob": soft} if soft is not None else {}
        losses, rew_c, rew_r = loss_fn(pol_c, pol_r, *ref, **extra)
    if nll_alpha > 0:
        # A pair of a prompt the judge did not separate keeps its pair loss but not this term.
        weight = nll_alpha * local.chosen_nll_weight.to(losses.dtype)
        losses = losses + weight * chosen_nll(pol_c, response_token_counts(local)[0])
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
    weights. `ref` is ignored, and may be None, for a reference-free loss (`LossType.needs_reference`),
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
    loss_type = LossType(cfg.loss)
    unpaired = loss_type.unpaired
    if unpaired != isinstance(batches[0], ExampleBatch):
        raise ValueError(f"dpo.loss={cfg.loss} trains on {'ExampleBatch' if unpaired else 'PairBatch'}es "
                         f"(make_{'example_' if unpaired else ''}batches), got {type(batches[0]).__name__}")
    if not unpaired and not loss_type.takes_soft_labels and any(b.has_soft_labels for b in batches):
        raise ValueError(f"pairs with chosen_prob != 1 (ties kept by pairs.drop_ties=false) need dpo.loss=sigmoid, "
                         f"not {cfg.loss}; set dpo.loss=sigmoid or pairs.drop_ties=true")
    reference_free = not loss_type.needs_reference
    if not reference_free and ref is None:
        raise ValueError(f"dpo.loss={cfg.loss} needs reference log-probs (see reference_logps); got ref=None")
    loss_fn = loss_fn_from_config(cfg, kto)
    names = metric_names(cfg.loss)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    groups = accumulation_groups(len(batches), cfg.grad_accum_steps)
    total_steps = len(groups) * cfg.epochs if cfg.max_steps < 0 else cfg.max_steps
    schedule = {"learning_rate": cfg.learning_rate, "schedule": cfg.lr_schedule, "warmup_steps": cfg.warmup_steps}
    if cfg.lr_schedule_span == "campaign":  # one schedule over every round: enter it where this round starts
        this_round, rounds = schedule_rounds
        scheduler = make_scheduler(optimizer, **schedule, total_steps=rounds * total_steps,
                                   start_step=this_round * total_steps)
    else:
        scheduler = make_scheduler(optimizer, **schedule, total_steps=total_steps)
    nll_alpha = nll_weight(cfg)
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
                    loss, sums = pair_step_sums(loss_fn, nll_alpha, local, policy, local_ref, soft)
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
