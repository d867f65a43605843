"""Typed campaign configuration: one dataclass per concern, YAML + dotted overrides.

A campaign YAML maps onto `CampaignConfig`; each nested section maps onto its own
dataclass. Unknown keys are rejected with the list of valid ones, and values are
checked against the field's type, so a typo fails before any model is loaded.

    cfg = load_config("configs/quickstart.yaml", ["dpo.beta=0.2", "rounds=2"])
"""

from online_dpo.config.loading import config_from_dict, judge_options, load_config, parse_overrides, to_dict, validate
from online_dpo.config.sections import (
    CampaignConfig,
    DataConfig,
    DPOConfig,
    EvalConfig,
    GenerationConfig,
    GuardConfig,
    JudgeConfig,
    KTOConfig,
    LoRAConfig,
    PairsConfig,
    PolicyConfig,
    ServersConfig,
)
from online_dpo.errors import ConfigError

__all__ = ["CampaignConfig", "ConfigError", "DPOConfig", "DataConfig", "EvalConfig", "GenerationConfig", "GuardConfig", "JudgeConfig", "KTOConfig", "LoRAConfig", "PairsConfig", "PolicyConfig", "ServersConfig", "config_from_dict", "judge_options", "load_config", "parse_overrides", "to_dict", "validate"]
