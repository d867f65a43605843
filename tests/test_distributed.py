"""The DPO update under DDP: two CPU processes (gloo) give the same weights and metrics as
one process. The probe (tests/ddp_probe.py) trains a tiny random Llama in fp32 on fixed
synthetic pairs (kept ties, gradient accumulation over uneven batches, warmup + cosine),
once training every weight, once LoRA with gradient checkpointing, and once with the KTO
loss on unpaired examples."""

import json
import math

import pytest
import torch

from tests.conftest import ROOT, free_port, run_python, tiny_llama

PROBE = str(ROOT / "tests" / "ddp_probe.py")


@pytest.fixture(scope="module")
def probe_runs(module_tmp):
    """(one-process output dir, two-process output dir)."""
    one, two = module_tmp / "one_process", module_tmp / "two_processes"
    # two processes on two cores, and the same kernels in both runs; the probe imports tests.conftest
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = run_python([PROBE, str(one)], timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    done = run_python(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                       "--master_port", str(free_port()), PROBE, str(two)], timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return one, two


@pytest.mark.parametrize("scenario", ["full", "lora", "kto"])
def test_two_processes_train_like_one(probe_runs, scenario):
    one, two = (d / scenario for d in probe_runs)
    a, b = torch.load(one / "weights.pt"), torch.load(two / "weights.pt")
    assert (a["processes"], b["processes"]) == (1, 2)

    # the reference pass: each process scores its share, the shares are gathered in order
    for parts1, parts2 in zip(a["ref"], b["ref"], strict=True):  # (chosen, rejected), or (logps,) for KTO
        assert all(torch.allclose(x1, x2, atol=1e-5) for x1, x2 in zip(parts1, parts2, strict=True))

    # the same update: merged weights agree far closer than the update moved them
    assert list(a["weights"]) == list(b["weights"])
    diff = max((a["weights"][k] - b["weights"][k]).abs().max().item() for k in a["weights"])
    assert diff < 1e-5, f"{scenario}: one and two processes differ by {diff}"
    initial = tiny_llama().state_dict()
    moved = max((a["weights"][k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 1e-4, f"{scenario}: the update barely moved the weights ({moved}), the comparison proves nothing"

    # the same metrics, on every rank
    m1 = json.loads((one / "metrics_rank0.json").read_text())
    m2 = [json.loads((two / f"metrics_rank{i}.json").read_text()) for i in range(2)]
    assert len(m1) == len(m2[0]) == 4  # 4 batches, accumulation 2, 2 epochs
    for s1, s2, s2_rank1 in zip(m1, *m2):
        assert s1.keys() == s2.keys()
        for k in s1:
            if k == "train_tokens_per_s":  # a timing
                continue
            assert s2[k] == s2_rank1[k] or math.isnan(s2[k]) and math.isnan(s2_rank1[k]), \
                f"step {s1['step']}: ranks log different {k}"
            same = math.isnan(s1[k]) and math.isnan(s2[k]) or abs(s1[k] - s2[k]) < 1e-5  # nan: no such example in the step
            assert same, f"step {s1['step']}: {k} {s1[k]} (1 process) vs {s2[k]} (2)"


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed_zero2"])
def test_accelerate_configs_load_and_say_how_to_run(name):
    from accelerate.commands.config.config_args import load_config_from_file

    path = ROOT / "configs" / "accelerate" / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert config.num_processes >= 2 and config.distributed_type.value in {"MULTI_GPU", "FSDP", "DEEPSPEED"}
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert f"accelerate launch --config_file configs/accelerate/{name}.yaml -m online_dpo.cli run configs/quickstart.yaml" in header
