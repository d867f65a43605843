import pytest

from online_dpo.config import CampaignConfig, ConfigError, load_config, parse_overrides


def test_quickstart_loads_with_overrides():
    cfg = load_config("configs/quickstart.yaml", ["dpo.beta=0.2", "rounds=2", "name=x"])
    assert isinstance(cfg, CampaignConfig)
    assert cfg.dpo.beta == 0.2 and cfg.rounds == 2 and cfg.name == "x"
    assert cfg.generation.backend == "vllm"


def test_unknown_top_level_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config("configs/quickstart.yaml", ["roundz=2"])
    msg = str(e.value)
    assert "'roundz'" in msg and "rounds" in msg and "dpo" in msg


def test_mistyped_nested_key_lists_valid_keys_of_its_section():
    with pytest.raises(ConfigError) as e:
        load_config("configs/quickstart.yaml", ["dpo.betta=0.2"])
    msg = str(e.value)
    assert "dpo.betta" in msg and "beta" in msg and "learning_rate" in msg


def test_wrong_type_and_bad_choice_are_rejected():
    with pytest.raises(ConfigError, match="dpo.beta"):
        load_config(None, ["dpo.beta=high"])
    with pytest.raises(ConfigError, match="generation.backend"):
        load_config(None, ["generation.backend=tensorrt"])
    with pytest.raises(ConfigError, match="rounds"):
        load_config(None, ["rounds=0"])


def test_int_promotes_to_float_but_bool_is_not_an_int():
    assert load_config(None, ["dpo.beta=1"]).dpo.beta == 1.0
    with pytest.raises(ConfigError):
        load_config(None, ["rounds=true"])


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


def test_override_syntax():
    assert parse_overrides(["a.b=1", "c=x"]) == {"a": {"b": 1}, "c": "x"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["dpo.beta"])


@pytest.mark.parametrize("path", sorted(__import__("glob").glob("configs/*.yaml")))
def test_every_shipped_config_loads_and_says_how_to_run_it(path):
    from pathlib import Path

    cfg = load_config(path)
    assert cfg.rounds >= 1
    assert "online-dpo run " in Path(path).read_text().split("\n\n")[0]  # the header says how to run it


def test_exponent_floats_without_a_dot_are_numbers():
    # PyYAML reads "1e-4" as a string; a user writing dpo.learning_rate=1e-4 means the number.
    cfg = load_config(None, ["dpo.learning_rate=1e-4", "dpo.beta=5E-2"])
    assert cfg.dpo.learning_rate == 1e-4 and cfg.dpo.beta == 0.05
    with pytest.raises(ConfigError, match="dpo.beta: expected float"):
        load_config(None, ["dpo.beta=high"])


def test_a_secret_in_the_judge_options_is_refused_before_anything_is_saved():
    with pytest.raises(ConfigError, match="api_key_env") as err:
        load_config("configs/openai_judge.yaml", ["judge.options.api_key=sk-live-abc123"])
    assert "sk-live-abc123" not in str(err.value)
    assert load_config("configs/openai_judge.yaml", ["judge.options.api_key_env=MY_KEY"]).judge.options["api_key_env"] == "MY_KEY"


def test_a_bare_no_in_yaml_or_an_override_is_the_choice_no_not_a_boolean(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dpo:\n  mixed_precision: no\n")
    assert load_config(path).dpo.mixed_precision == "no"  # YAML 1.1 reads `no` as False
    assert load_config(None, ["dpo.mixed_precision=no"]).dpo.mixed_precision == "no"
    with pytest.raises(ConfigError, match="is not one of"):
        load_config(None, ["dpo.lr_schedule=no"])  # no choice spelled no/off/false there: still an error


def test_a_key_earlier_versions_wrote_and_nothing_reads_still_loads(tmp_path):
    """policy.seed was never read; a run directory's config.yaml that still has it resumes."""
    path = tmp_path / "config.yaml"
    path.write_text("policy:\n  model: embedded\n  seed: 0\n")
    assert load_config(path).policy.model == "embedded"
    assert not hasattr(load_config(path).policy, "seed")


TRAINING_DEFAULTS = ("rounds", "data.train_prompts_per_round", "data.eval_prompts", "generation.samples_per_prompt",
                     "generation.max_new_tokens", "generation.temperature", "pairs.strategy", "dpo.loss", "dpo.beta",
                     "dpo.learning_rate", "dpo.max_steps", "dpo.epochs", "dpo.batch_size", "eval.max_new_tokens")


@pytest.mark.parametrize("path", sorted(__import__("glob").glob("configs/*.yaml")))
def test_every_shipped_config_shares_the_quickstarts_training_defaults_or_says_why(path):
    import re
    from pathlib import Path

    def value(cfg, key):
        section, _, name = key.rpartition(".")
        return getattr(getattr(cfg, section) if section else cfg, name)

    quickstart, cfg = load_config("configs/quickstart.yaml"), load_config(path)
    # A config may differ where a comment says so: "# differs from the quickstart: dpo.beta (why ...)".
    explained = set()
    for line in Path(path).read_text().splitlines():
        if m := re.search(r"#\s*differs from the quickstart:\s*(.*)", line):
            explained |= set(re.findall(r"[a-z_]+(?:\.[a-z_]+)*", m.group(1).split("(")[0]))
    differ = {key for key in TRAINING_DEFAULTS if value(cfg, key) != value(quickstart, key)}
    assert differ <= explained, f"{path} differs from configs/quickstart.yaml in {sorted(differ - explained)} " \
                                f"without a '# differs from the quickstart: KEY (why)' comment"


def test_an_optional_section_left_null_stays_unset_through_a_saved_config(tmp_path):
    """A run's config.yaml writes an unset eval.judge as null; reading it back (resume) must not
    turn it into a judge section of defaults."""
    import yaml

    from online_dpo.config import to_dict

    cfg = load_config("configs/quickstart.yaml")
    assert cfg.eval.judge is None
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    assert "judge: null" in saved.read_text() and load_config(saved).eval.judge is None
    assert load_config(saved, ["eval.judge.name=regex"]).eval.judge.name == "regex"
