"""The disk weight transport and the server backend's config checks, without a server."""

import pytest
import torch

from online_dpo.config import ConfigError, load_config
from online_dpo.engines.transports import DiskTransport, NcclTransport, separate_tensors


def test_tied_weights_are_written_under_both_names_and_versions_replace_atomically(tmp_path):
    from safetensors.torch import load_file

    embed = torch.arange(6.0).reshape(3, 2)
    weights = [("model.embed_tokens.weight", embed), ("lm_head.weight", embed), ("norm.weight", torch.ones(2))]
    separate = separate_tensors(weights)
    assert list(separate) == ["model.embed_tokens.weight", "lm_head.weight", "norm.weight"]
    assert separate["lm_head.weight"].data_ptr() != separate["model.embed_tokens.weight"].data_ptr()
    assert torch.equal(separate["lm_head.weight"], embed)

    transport = DiskTransport(tmp_path / "pushed", keep=2)
    for version in ("round-0", "round-1", "round-2"):
        folder = transport.write(weights, version)
        transport.prune(keep_also=folder)
    assert sorted(p.name for p in (tmp_path / "pushed").iterdir()) == ["round-1", "round-2"]  # no temp folder left
    loaded = load_file(str(tmp_path / "pushed" / "round-2" / "model.safetensors"))
    assert set(loaded) == {"model.embed_tokens.weight", "lm_head.weight", "norm.weight"}
    assert torch.equal(loaded["lm_head.weight"], embed)
    # A version pushed again (after a roll-back) replaces its folder with the new tensors.
    transport.write([("norm.weight", torch.zeros(2))], "round-1")
    assert torch.equal(load_file(str(tmp_path / "pushed" / "round-1" / "model.safetensors"))["norm.weight"], torch.zeros(2))


def test_pushes_delete_nothing_but_their_own_folders_in_a_shared_weights_dir(tmp_path):
    """servers.weights_dir may name a folder that holds other things: old versions are pruned, and
    nothing of anyone else's is deleted or replaced."""
    shared = tmp_path / "shared"
    (shared / "my-models" / "llama").mkdir(parents=True)
    (shared / "my-models" / "llama" / "weights.bin").write_bytes(b"mine")
    (shared / "round-3").mkdir()
    (shared / "round-3" / "notes.txt").write_text("a folder of the user's that looks like a version")
    transport = DiskTransport(shared, keep=1)
    weights = [("norm.weight", torch.ones(2))]
    for version in ("round-0", "round-1", "round-2"):
        transport.prune(keep_also=transport.write(weights, version))
    assert sorted(p.name for p in shared.iterdir()) == ["my-models", "round-2", "round-3"]
    with pytest.raises(ConfigError, match="round-3 is in the way of a weight push.*servers.weights_dir"):
        transport.write(weights, "round-3")
    assert (shared / "round-3" / "notes.txt").exists() and (shared / "my-models" / "llama" / "weights.bin").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_nccl_is_refused_without_a_gpu():
    with pytest.raises(ConfigError, match=r"weight_transport=nccl .* no CUDA GPU; use servers.weight_transport=disk"):
        NcclTransport(port=29531, timeout_s=60)


@pytest.mark.parametrize("overrides, message", [
    (["generation.backend=vllm_server"], r"needs their URLs: servers.urls=\[http://HOST:PORT\].*online-dpo serve"),
    (["generation.backend=vllm_server", "servers.urls=[localhost:8000]"], r"must be http\(s\) URLs"),
    (["generation.backend=vllm_server", "servers.urls=[http://a:1,http://a:1]"], r"lists a server twice"),
    (["generation.async_rounds=1"], r"async_rounds=1 .* needs generation.backend=vllm_server"),
    (["generation.backend=vllm_server", "servers.urls=[http://a:1]", "servers.weight_transport=ncl"],
     r"did you mean 'nccl'"),
])
def test_server_backend_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_serve_takes_its_own_options_and_passes_what_follows_dashes_to_vllm(monkeypatch):
    import online_dpo.engines.serve as serve
    from online_dpo.cli import main

    seen = {}

    def fake_start(model_path, **options):
        seen.update(options, model_path=model_path)
        raise SystemExit(0)  # stop before a server would start

    monkeypatch.setattr(serve, "start_server", fake_start)
    with pytest.raises(SystemExit):
        main(["serve", "embedded", "--port", "8134", "--max-model-len", "512", "--", "--tensor-parallel-size", "2"])
    assert seen["port"] == 8134 and seen["max_model_len"] == 512
    assert seen["extra"] == ["--tensor-parallel-size", "2"]
    argv, env = serve.server_command("/m", port=8134, dtype="float32", max_model_len=512, extra=["--x"])
    assert argv[argv.index("--port") + 1] == "8134" and argv.count("--port") == 1 and argv[-1] == "--x"
    assert env["VLLM_SERVER_DEV_MODE"] == "1" and "--enable-scale-out" in argv
    assert argv[argv.index("--logprobs-mode") + 1] == "raw_logprobs"


SERVE_THEN_WAIT = """
import subprocess, sys
import online_dpo.engines.serve as serve
from online_dpo.cli import main

def start_stand_in(model_path, **options):
    # a process group like a vLLM server's: a leader and a child, in their own session
    child = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); time.sleep(600)"
    process = subprocess.Popen([sys.executable, "-c", child], start_new_session=True)
    print(process.pid, flush=True)
    return process, "http://127.0.0.1:1"

serve.start_server = start_stand_in
serve.wait_ready = lambda url, process, timeout_s=600.0, api_key=None: None
sys.exit(main(["serve", "embedded"]))
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_a_signal_to_serve_stops_its_server_and_the_server_s_processes(sig):
    """The server leads its own process group, out of reach of a signal to `online-dpo serve`;
    serve must stop it on its way out."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    serve = subprocess.Popen([sys.executable, "-c", SERVE_THEN_WAIT], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    group = int(serve.stdout.readline())
    time.sleep(1.0)  # serve is now waiting on its server
    os.killpg(group, 0)  # the stand-in server's group is alive
    serve.send_signal(getattr(signal, sig))
    assert serve.wait(timeout=60) == 128 + getattr(signal, sig)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return  # no process of the group is left
        time.sleep(0.2)
    os.killpg(group, signal.SIGKILL)
    raise AssertionError(f"{sig} to serve left its server's processes running")
