import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def worker_threads() -> int:
    """OpenMP threads for this test process and the processes it starts: the cores it may use,
    shared among the pytest-xdist workers running beside it (more threads than cores make
    OpenMP's spinning threads wait on each other)."""
    from online_dpo.hardware import available_cores

    return max(1, available_cores() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


def pytest_configure(config):
    # Before anything imports torch, which reads it once: in-process models and every process
    # a test starts get this worker's share of the cores.
    os.environ["OMP_NUM_THREADS"] = str(worker_threads())
    # A key exported in the user's shell would make every server the tests start a keyed one
    # (online-dpo serve reads it by default); the tests that want a key set their own.
    os.environ.pop("ONLINE_DPO_SERVER_API_KEY", None)


# The modules that take minutes, slowest first. pytest-xdist hands whole modules to the workers
# in collection order (pyproject.toml: --dist loadfile --no-loadscope-reorder), so these start
# first and the many short modules fill in around them; one started last would run alone.
SLOWEST_MODULES = ("test_server_generation", "test_chaos", "test_crash_resume", "test_campaign_options",
                   "test_every_rank", "test_openai_judge_vllm_server", "test_compare", "test_noisy_api_judge",
                   "test_report", "test_embedded_model", "test_api", "test_campaign", "test_weight_sync",
                   "test_distributed", "test_vllm_judge", "test_budget_resume", "test_openai_judge_faults")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rpartition(".")[2], len(rank)))  # stable


def free_port() -> int:
    """A localhost port no one listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_python(args: list[str], timeout: int, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run a Python entry point in a fresh process (vLLM keeps process-global state), with this
    worker's threads (pytest_configure) unless `env` says otherwise."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def last_json_line(stdout: str) -> dict:
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON line in output:\n{stdout[-2000:]}")


@pytest.fixture(scope="session")
def embedded_model_path() -> str:
    from judges.models import embedded_model_dir

    return str(embedded_model_dir())


SHALLOW_LAYERS = 2
# A judge for campaigns on the shallow model: scores fall with length past 20 characters, so
# candidates of different lengths form pairs whatever they say, and every round trains.
BY_LENGTH = ["judge.name=length", "judge.options={max_chars: 20, slack: 200}"]


@pytest.fixture(scope="session")
def shallow_model_path(embedded_model_path, tmp_path_factory) -> str:
    """The embedded model cut to its first SHALLOW_LAYERS of 30 decoder layers (embeddings, final
    norm, tokenizer and chat template kept): a quarter of the compute per token. For the tests of a
    campaign's mechanics (schedules, data sources, losses, resume, servers), which hold for any
    policy. Its answers are word salad that runs to max_new_tokens, so a test on it needs a judge
    that ranks any text (length, a fake API judge's hash), not correct answers: an arithmetic
    verifier scores them all wrong, a tie, and the round has nothing to train on."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dst = Path(embedded_model_path), tmp_path_factory.mktemp("shallow-model")
    for f in src.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            shutil.copy(f, dst / f.name)
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = SHALLOW_LAYERS
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    with safe_open(src / "model.safetensors", framework="pt") as weights:  # reads only the tensors kept
        kept = {name: weights.get_tensor(name) for name in weights.keys()
                if not name.startswith("model.layers.") or int(name.split(".")[2]) < SHALLOW_LAYERS}
    save_file(kept, dst / "model.safetensors", metadata={"format": "pt"})
    return str(dst)


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory, request) -> Path:
    """A folder for one test module's campaigns, deleted when the module's tests are done unless
    one of them failed. A campaign writes ~0.5 GB of checkpoint a round; kept to the session's
    end (pytest's default), a whole suite's worth (~6 GB) once filled the CI machine's disk."""
    path = tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2])
    failed_before = request.session.testsfailed
    yield path
    if request.session.testsfailed == failed_before:
        shutil.rmtree(path, ignore_errors=True)


TINY_LLAMA = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 1}


def tiny_llama(seed: int = 0, **changes):
    """The randomly initialised 2-layer Llama (vocabulary 64) the unit tests train: the same
    weights for the same seed. `changes` override fields of TINY_LLAMA."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **changes}))
