"""YAML and dotted overrides -> a checked `CampaignConfig`: unknown keys and wrong types are
rejected with what is valid, and cross-field checks say how to fix a combination."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from online_dpo.config.loss_type import LossType
from online_dpo.config.sections import CampaignConfig, JudgeConfig
from online_dpo.errors import ConfigError


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
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: {value!r} is not one of {list(allowed)}{hint}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None  # before a dataclass arm, which would read None as its defaults
        errors = []
        for arm in typing.get_args(tp):
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


# Keys that earlier versions wrote into a run's config.yaml and that nothing reads any more:
# skipped, so those runs still resume.
RETIRED_KEYS = {"policy.seed"}


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    prefix = f"{where}." if where else ""
    data = {k: v for k, v in data.items() if f"{prefix}{k}" not in RETIRED_KEYS}
    unknown = [k for k in data if k not in names]
    if unknown:
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
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not a YAML value "
                              f"({getattr(e, 'problem', None) or e}); quote it, "
                              f"e.g. {key.strip()}='\"...\"'") from None
        _set_dotted(tree, key.strip(), value)
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
        (cfg.judge.second_order != "deciding" or cfg.pairs.strategy == "best_vs_worst",
         f"judge.second_order=deciding asks the second order only of the games that decide a best-vs-worst pair; "
         f"pairs.strategy={cfg.pairs.strategy} uses other candidates too. Set judge.second_order=all"),
        (cfg.generation.backend != "vllm_server" or bool(cfg.servers.urls),
         "generation.backend=vllm_server generates on vLLM servers and needs their URLs: servers.urls=[http://HOST:PORT] "
         "(start one with `online-dpo serve MODEL`)"),
        (all(u.startswith(("http://", "https://")) for u in cfg.servers.urls),
         f"servers.urls must be http(s) URLs such as http://localhost:8000, got {cfg.servers.urls}"),
        (len(set(cfg.servers.urls)) == len(cfg.servers.urls), f"servers.urls lists a server twice: {cfg.servers.urls}"),
        (cfg.servers.timeout_s > 0 and cfg.servers.max_concurrent_requests >= 1,
         "servers.timeout_s must be > 0 and servers.max_concurrent_requests >= 1"),
        (cfg.servers.probe_tolerance > 0, "servers.probe_tolerance must be > 0"),
        (cfg.generation.async_rounds == 0 or cfg.generation.backend == "vllm_server",
         "generation.async_rounds=1 generates the next round on the servers while this round's update runs; it "
         "needs generation.backend=vllm_server"),
        (cfg.generation.kv_cache_gb == "auto" or cfg.generation.kv_cache_gb >= 0,
         "generation.kv_cache_gb must be auto, 0 (vLLM's own sizing) or a size in GiB"),
        (cfg.generation.kv_block_tokens == "auto" or cfg.generation.kv_block_tokens > 0,
         "generation.kv_block_tokens must be auto or a number of tokens (a multiple of 32 on a CPU)"),
        (cfg.dpo.beta > 0, "dpo.beta must be > 0"),
        (cfg.dpo.batch_size >= 1, "dpo.batch_size must be >= 1"),
        (0.0 <= cfg.dpo.label_smoothing < 0.5, "dpo.label_smoothing must be in [0, 0.5)"),
        (cfg.dpo.rpo_alpha == "auto" or cfg.dpo.rpo_alpha >= 0.0, "dpo.rpo_alpha must be auto or >= 0"),
        (cfg.dpo.simpo_gamma >= 0.0, "dpo.simpo_gamma must be >= 0"),
        (cfg.dpo.orpo_lambda >= 0.0, "dpo.orpo_lambda must be >= 0"),
        (LossType(cfg.dpo.loss).needs_reference or cfg.dpo.reference == "refreshed",
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
        (not LossType(cfg.dpo.loss).unpaired or cfg.dpo.rpo_alpha in ("auto", 0),
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
        (0.0 <= cfg.eval.max_judge_error_fraction < 1.0,
         "eval.max_judge_error_fraction must be in [0, 1): an eval that is all judge errors has no win rate"),
        (0.0 < cfg.data.eval_fraction < 1.0, "data.eval_fraction must be between 0 and 1"),
        (0.0 < cfg.generation.gpu_memory_utilization <= 1.0, "generation.gpu_memory_utilization must be in (0, 1]"),
        (cfg.guard.on_loss in ("auto", "off") or cfg.eval.enabled and cfg.eval.compare_previous,
         f"guard.on_loss={cfg.guard.on_loss} judges each round against the policy it started from on the held-out "
         f"prompts; it needs eval.enabled=true and eval.compare_previous=true (or set guard.on_loss=off)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    problem = run_name_problem(cfg.name)
    if problem:
        raise ConfigError(f"name={cfg.name!r} {problem}; the run directory is output_dir/name "
                          f"({cfg.output_dir}/<name>), so name must be one plain folder name such as name=my-run")
    # The resolved config is saved in the run directory: a secret written into it would land on disk.
    for where, judge in (("judge", cfg.judge), ("eval.judge", cfg.eval.judge)):
        secret = [k for k in (judge.options if judge else {}) if k.lower() in SECRET_OPTION_NAMES]
        if secret:
            raise ConfigError(
                f"{where}.options.{secret[0]}: secrets are never taken in the config (it is saved with the run); put "
                f"the key in an environment variable and name it with {where}.options.api_key_env=VARIABLE_NAME")


def run_name_problem(name: str) -> str | None:
    """Why `name` cannot name a run directory, or None. It must be one plain path component:
    `..`, a separator or an absolute path would put the run (and what --overwrite or a failed
    start deletes) outside output_dir."""
    if not name.strip():
        return "is empty"
    if name in (".", ".."):
        return "names the output folder itself or its parent"
    if "/" in name or "\\" in name:
        return "contains a path separator"
    if any(ord(ch) < 32 for ch in name):
        return "contains a control character"
    if name.startswith("-"):
        return "starts with '-', which commands would read as an option"
    if name != name.strip():
        return "starts or ends with white space"
    return None


SECRET_OPTION_NAMES = {"api_key", "key", "token", "secret", "password", "access_token"}


def judge_options(judge: JudgeConfig) -> dict:
    """The keyword options judge.name's constructor gets: judge.options, and cache=False with
    judge.cache=off for a judge that keeps a reply cache (`caches_replies`)."""
    from judges.registry import judge_class

    options = dict(judge.options)
    if judge.cache == "off" and getattr(judge_class(judge.name), "caches_replies", False):
        options["cache"] = False
    return options


def to_dict(cfg: CampaignConfig) -> dict:
    return dataclasses.asdict(cfg)
