"""Every command a config's header documents runs as written on the machine it names, or stops
at start, before any model loads, with the fix in its message. Each command goes through the
campaign's own checks: the config with the command's overrides, and for the accelerate configs
what the campaign asks of a launch (check_launch), fed what accelerate reads from that file."""

from __future__ import annotations

import re
import types

import pytest

import online_dpo
from judges.base import JudgeUnreachable
from online_dpo import campaign
from online_dpo.config import ConfigError, load_config
from tests.conftest import ROOT, free_port
from tests.test_readme import command_problems, online_dpo_args, shell_commands, subcommands

CONFIGS = sorted(p.relative_to(ROOT) for p in (ROOT / "configs").rglob("*.yaml"))


def header_commands(path) -> list[list[str]]:
    """The online-dpo commands of a config's comment header (as accelerate launches them too), each
    with its launcher's arguments before it; a line's label ("Run it:") and continuations handled."""
    header = "".join(line[1:] for line in (ROOT / path).read_text().splitlines(keepends=True) if line.startswith("#"))
    found = []
    for line in header.replace("\\\n", " ").splitlines():
        if "online-dpo " not in line and "online_dpo.cli" not in line:
            continue
        line = re.sub(r"^\s*[A-Z][\w ()-]*:\s+", "", line)  # its label
        line = re.sub(r"\s{2,}\(.*\)\s*$", "", line)  # a remark after it
        found += [command for command in shell_commands(line) if online_dpo_args(command) is not None]
    return found


def launch_of(accelerate_yaml) -> types.SimpleNamespace:
    """What accelerate reads from a launch config: its distributed type, processes and ZeRO stage,
    in the shape check_launch reads off an Accelerator."""
    from accelerate.commands.config.config_args import load_config_from_file

    launch = load_config_from_file(str(ROOT / accelerate_yaml))
    stage = (launch.deepspeed_config or {}).get("zero_stage")
    return types.SimpleNamespace(distributed_type=launch.distributed_type, num_processes=launch.num_processes,
                                 deepspeed_config={"zero_optimization": {"stage": stage}})


@pytest.mark.parametrize("path", CONFIGS, ids=str)
def test_every_command_a_config_documents_passes_the_campaigns_checks(path):
    commands = header_commands(path)
    assert any("run" in online_dpo_args(c) for c in commands), f"{path} documents no `online-dpo run` command"
    known = subcommands()
    for command in commands:
        args = online_dpo_args(command)
        assert not command_problems(args, known), (path, command, command_problems(args, known))
        if "--config_file" in command:  # accelerate launch: what the campaign asks of that launch
            launch = launch_of(command[command.index("--config_file") + 1])
            cfg = load_config(ROOT / args[1], [a for a in args[2:] if "=" in a])
            guard, _ = campaign.check_launch(cfg, launch)
            if launch.distributed_type.value in campaign.SHARDED_OPTIMIZER:
                assert guard == "off", (path, "a roll-back cannot restore a sharded optimizer state")


def stop_before_models_load(monkeypatch):
    def loaded(*args, **kwargs):
        raise AssertionError("a model loaded before the campaign's checks stopped it")

    monkeypatch.setattr(campaign, "build_policy", loaded)


def test_a_launch_the_settings_cannot_take_stops_before_any_model_loads(tmp_path, monkeypatch):
    """The DeepSpeed header's command once failed after the model loaded (the guard refused it).
    Now an explicit setting such a launch cannot take stops at start, saying what to set."""
    import accelerate

    stop_before_models_load(monkeypatch)
    zero2 = launch_of("configs/accelerate/deepspeed_zero2.yaml")
    fake = types.SimpleNamespace(**vars(zero2), is_main_process=True, device="cpu")
    monkeypatch.setattr(accelerate, "Accelerator", lambda **kwargs: fake)
    cases = [("guard.on_loss=retry", "set guard.on_loss=off"), ("dpo.optimizer_state=carry", "dpo.optimizer_state=fresh"),
             ("dpo.batch_size=3", "a multiple of 2")]
    for override, fix in cases:
        cfg = load_config("configs/quickstart.yaml", [f"output_dir={tmp_path}", f"name=x{len(override)}", override])
        with pytest.raises(ConfigError, match=fix):
            online_dpo.run(cfg)
        assert not cfg.run_dir.exists()  # stopped on its input before any stage: nothing left to resume


def test_a_judge_server_that_is_not_running_stops_the_start_before_any_model_loads(tmp_path, monkeypatch):
    """configs/local_vllm_judge.yaml's command without its server started first."""
    stop_before_models_load(monkeypatch)
    url = f"http://127.0.0.1:{free_port()}/v1"
    # float32 as the suite's other in-process campaigns: accelerate's state is one per process
    cfg = load_config("configs/local_vllm_judge.yaml", [f"output_dir={tmp_path}", "name=no-server",
                                                          f"judge.options.base_url={url}", "dpo.mixed_precision=no"])
    with pytest.raises(JudgeUnreachable, match=f"cannot reach its endpoint {url}.*start the server"):
        online_dpo.run(cfg)
    assert not cfg.run_dir.exists()
