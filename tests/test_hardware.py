"""Every hardware-dependent `auto`, resolved for each kind of machine the project runs on:
an AVX2-only CPU (bf16 emulated), an AVX512-BF16 CPU and a bf16 GPU. The suite itself runs on
one kind only, so the other kinds are checked here by their resolution rules."""

import pytest

from online_dpo.config import load_config
from online_dpo.hardware import Hardware, resolve, resolve_threads

AVX2 = Hardware("cpu", fast_bf16=False, cpu_capability="AVX2", cpu_bf16_flags=(), cores=2)
AVX512_BF16 = Hardware("cpu", fast_bf16=True, cpu_capability="AVX512", cpu_bf16_flags=("avx512_bf16",), cores=2)
GPU = Hardware("cuda", fast_bf16=True, cpu_capability="AVX512", cpu_bf16_flags=(), cores=16)


@pytest.mark.parametrize("hw,precision,dtype,reference,kv,block", [
    (AVX2, "no", "float32", "generation", "auto", 32),  # float32 on both sides: vLLM's log-probs are the reference
    (AVX512_BF16, "bf16", "bfloat16", "forward", "auto", 32),  # bf16 is native: both sides use it
    (GPU, "bf16", "bfloat16", "forward", 0, None),  # on a GPU vLLM sizes its own KV cache, in its own blocks
])
def test_autos_resolve_per_kind_of_machine(hw, precision, dtype, reference, kv, block):
    r = resolve(load_config(None, []), hw, environ={})
    assert (r.mixed_precision.value, r.generation_dtype.value, r.reference_logps.value, r.kv_cache_gb.value,
            r.kv_block_tokens.value) == (precision, dtype, reference, kv, block)
    assert all(line for line in r.lines()) and r.as_dict()["hardware"]["fast_bf16"] == hw.fast_bf16
    for name in ("mixed_precision", "generation_dtype", "reference_logps", "kv_cache_gb", "kv_block_tokens"):
        assert getattr(r, name).reason.startswith("auto")


def test_explicit_settings_win_and_forced_bf16_without_native_support_says_it_is_emulated():
    r = resolve(load_config(None, ["dpo.mixed_precision=bf16", "generation.dtype=float32"]), AVX2, environ={})
    assert r.mixed_precision.value == "bf16" and "emulated" in r.mixed_precision.reason
    assert r.generation_dtype.value == "float32" and r.reference_logps.value == "forward"
    assert "bf16 autocast" in r.reference_logps.reason
    r = resolve(load_config(None, ["dpo.mixed_precision=no", "generation.dtype=float32"]), AVX512_BF16, environ={})
    assert r.reference_logps.value == "generation"  # pinned to float32 on a bf16 machine: exact again


def test_hf_backend_has_no_vllm_dtype():
    r = resolve(load_config(None, ["generation.backend=hf"]), AVX512_BF16, environ={})
    assert r.generation_dtype.value is None and r.reference_logps.value == "forward"
    assert r.kv_block_tokens.value is None


def test_kv_blocks_set_in_the_config_win_and_cpu_servers_get_the_cpu_blocks(monkeypatch):
    from online_dpo.engines.serve import server_command

    assert resolve(load_config(None, ["generation.kv_block_tokens=64"]), AVX2, environ={}).kv_block_tokens.value == 64
    on_servers = ["generation.backend=vllm_server", "servers.urls=[http://h:1]"]
    servers = resolve(load_config(None, on_servers), AVX2, environ={})
    assert servers.kv_block_tokens.value is None and "online-dpo serve" in servers.kv_block_tokens.reason
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    argv, _ = server_command("/models/m")
    assert argv[argv.index("--block-size") + 1] == "32"
    argv, _ = server_command("/models/m", extra=["--block-size", "64"])  # the user's own choice is kept
    assert argv.count("--block-size") == 1 and argv[argv.index("--block-size") + 1] == "64"


def test_a_cpu_server_on_a_small_machine_computes_on_every_core(monkeypatch):
    """vLLM runs a CPU server's model in a worker process and keeps a core for its scheduler; on
    up to 4 cores `online-dpo serve` runs the model in the engine process on every core, unless the
    user set vLLM's own core settings or the threads."""
    from online_dpo.engines.serve import VLLM_CORE_SETTINGS, cpu_core_env, server_command

    in_engine = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    assert cpu_core_env({}, 2) == {**in_engine, "OMP_NUM_THREADS": "2"}
    assert cpu_core_env({}, 4) == {**in_engine, "OMP_NUM_THREADS": "4"}
    assert cpu_core_env({"OMP_NUM_THREADS": "1"}, 2) == {**in_engine, "OMP_NUM_THREADS": "1"}
    assert cpu_core_env({}, 8) == {}
    for setting in VLLM_CORE_SETTINGS:
        assert cpu_core_env({setting: "1"}, 2) == {}
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr("online_dpo.hardware.available_cores", lambda: 2)
    for setting in VLLM_CORE_SETTINGS:
        monkeypatch.delenv(setting, raising=False)
    assert server_command("/models/m")[1]["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


def test_threads_are_the_processes_share_of_the_cores_it_may_use(monkeypatch):
    monkeypatch.setattr("online_dpo.hardware.available_cores", lambda: 16)
    assert resolve_threads({}).value == 16
    assert resolve_threads({"LOCAL_WORLD_SIZE": "4"}).value == 4  # four processes on this node
    assert resolve_threads({"LOCAL_WORLD_SIZE": "32"}).value == 1
    given = resolve_threads({"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "4"})
    assert given.value == 3 and "environment" in given.reason


def test_detect_agrees_with_torch_on_this_machine():
    import torch

    hw = Hardware.detect()
    if torch.cuda.is_available():
        assert hw.device == "cuda" and hw.fast_bf16 == torch.cuda.is_bf16_supported()
    else:
        assert hw.device == "cpu" and hw.fast_bf16 == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert hw.cores >= 1 and hw.cpu_capability == torch.backends.cpu.get_cpu_capability()
