"""`online-dpo serve`'s API key (engines.serve): a server that listens beyond loopback is refused
without one, before anything starts; the key reaches the server through its environment, never
its command line; and a keyed server requires it on every path, dev mode's included (vLLM's own
--api-key guards only /v1, /v2, /inference and /cohere). The real server with a key is in
tests/test_chaos.py (its campaign runs on it)."""

from __future__ import annotations

import re
import subprocess

import pytest

from online_dpo.engines import serve
from online_dpo.errors import ConfigError

KEY = "s3cret-for-tests"


@pytest.fixture(autouse=True)
def no_key_in_the_environment(monkeypatch):
    for name in (serve.DEFAULT_API_KEY_ENV, serve.SERVER_KEY_ENV, "TEST_SERVER_KEY"):
        monkeypatch.delenv(name, raising=False)


def test_serve_beyond_loopback_without_a_key_exits_2_before_anything_starts(monkeypatch, capsys):
    from online_dpo.cli import main

    def must_not_run(*args, **kwargs):
        raise AssertionError("something started before the host was checked")

    monkeypatch.setattr("judges.models.resolve_model_path", must_not_run)
    monkeypatch.setattr(subprocess, "Popen", must_not_run)
    assert main(["serve", "embedded", "--host", "0.0.0.0", "--port", "8123"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert re.fullmatch(
        r"error: online-dpo serve --host 0\.0\.0\.0 listens beyond this machine without an API key, .*dev mode: "
        r"anyone who reaches the port could pause it, run methods on its workers \(/collective_rpc\) and load "
        r"weights from any path on its disk\. Export ONLINE_DPO_SERVER_API_KEY=<a long random secret> .*"
        r"servers\.api_key_env=ONLINE_DPO_SERVER_API_KEY.*or listen on 127\.0\.0\.1 only\n", err), err


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost"])
def test_a_loopback_server_needs_no_key(host):
    assert serve.server_api_key(host) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "192.168.1.2", "gpu-node-1", ""])
def test_every_other_host_needs_a_key(host, monkeypatch):
    with pytest.raises(ConfigError, match="listens beyond this machine without an API key"):
        serve.server_api_key(host)
    monkeypatch.setenv(serve.DEFAULT_API_KEY_ENV, KEY)
    assert serve.server_api_key(host) == KEY


def test_a_named_key_variable_must_be_set(monkeypatch):
    with pytest.raises(ConfigError, match=r"--api-key-env TEST_SERVER_KEY: the environment variable TEST_SERVER_KEY "
                                          r"is not set .*servers.api_key_env=TEST_SERVER_KEY"):
        serve.server_api_key("127.0.0.1", "TEST_SERVER_KEY")
    monkeypatch.setenv("TEST_SERVER_KEY", KEY)
    assert serve.server_api_key("0.0.0.0", "TEST_SERVER_KEY") == KEY


@pytest.mark.parametrize("extra, instead", [(["--api-key", KEY], "an environment variable"),
                                            ([f"--api-key={KEY}"], "an environment variable"),
                                            (["--host", "0.0.0.0"], "online-dpo serve --host"),
                                            (["--host=0.0.0.0"], "online-dpo serve --host")])
def test_the_address_and_the_key_are_not_taken_after_the_dashes(extra, instead):
    """vLLM takes the last --host given, which would bypass the check, and a key on the command
    line is shown by ps to every user of the machine."""
    with pytest.raises(ConfigError, match=f"after -- goes to vLLM unchecked; use {instead}"):
        serve.server_api_key("127.0.0.1", None, extra)


class StartedProcess:
    """Stands in for subprocess.Popen: records what a server would have been started with."""

    started: list[tuple[list[str], dict]] = []

    def __init__(self, argv, env=None, **kwargs):
        StartedProcess.started.append((argv, env))


@pytest.mark.parametrize("variable", ["TEST_SERVER_KEY", None])
def test_the_key_goes_into_the_servers_environment_not_its_command_line(variable, monkeypatch):
    monkeypatch.setattr(subprocess, "Popen", StartedProcess)
    monkeypatch.setenv(variable or serve.DEFAULT_API_KEY_ENV, KEY)
    StartedProcess.started.clear()
    serve.start_server("/models/m", host="0.0.0.0", port=8123, api_key_env=variable)
    [(argv, env)] = StartedProcess.started
    assert env[serve.SERVER_KEY_ENV] == KEY
    assert not any(KEY in arg for arg in argv), argv
    assert argv[argv.index("--middleware") + 1] == "online_dpo.engines.serve.RequireApiKey"
    assert argv[argv.index("--host") + 1] == "0.0.0.0"


def test_a_loopback_server_without_a_key_starts_without_the_guard(monkeypatch):
    monkeypatch.setattr(subprocess, "Popen", StartedProcess)
    StartedProcess.started.clear()
    serve.start_server("/models/m", port=8123)
    [(argv, env)] = StartedProcess.started
    assert serve.SERVER_KEY_ENV not in env and "--middleware" not in argv


def guarded_app():
    """A small ASGI app with a dev-mode path, an OpenAI path and /health, behind RequireApiKey."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def ok(request):
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/collective_rpc", ok, methods=["POST"]), Route("/pause", ok, methods=["POST"]),
                            Route("/v1/models", ok), Route("/health", ok)])
    return serve.RequireApiKey(app)


def test_a_keyed_server_requires_the_key_on_every_path(monkeypatch):
    from starlette.testclient import TestClient

    monkeypatch.setenv(serve.SERVER_KEY_ENV, KEY)
    client = TestClient(guarded_app())
    calls = [("POST", "/collective_rpc"), ("POST", "/pause"), ("GET", "/v1/models"), ("GET", "/health")]
    for method, path in calls:
        assert client.request(method, path).status_code == 401, path
        for wrong in (f"Bearer {KEY}x", f"Basic {KEY}", KEY, "Bearer "):
            assert client.request(method, path, headers={"Authorization": wrong}).status_code == 401, (path, wrong)
        answer = client.request(method, path, headers={"Authorization": f"Bearer {KEY}"})
        assert answer.status_code == 200 and answer.json() == {"ok": True}, path
    refused = client.post("/collective_rpc")
    assert KEY not in refused.text and refused.headers["www-authenticate"] == "Bearer"
    # a CORS preflight carries no credentials: it reaches the app (which has no OPTIONS route)
    assert client.options("/v1/models").status_code == 405


def test_the_guard_refuses_to_start_without_its_key():
    with pytest.raises(RuntimeError, match="needs the API key in VLLM_API_KEY"):
        guarded_app()


def test_a_campaign_reads_the_servers_key_from_the_variable_its_config_names(tmp_path, monkeypatch, shallow_model_path):
    """servers.api_key_env reaches the campaign's generator: named but unset, the start stops
    with a message naming the variable (and never a key)."""
    import online_dpo
    from online_dpo.config import ConfigError, load_config

    monkeypatch.delenv("ONLINE_DPO_TEST_UNSET_KEY", raising=False)
    cfg = load_config("configs/quickstart.yaml", [f"output_dir={tmp_path}", "name=keyed", "generation.backend=vllm_server",
                                                  "servers.urls=[http://127.0.0.1:9]", f"policy.model={shallow_model_path}",
                                                  "servers.api_key_env=ONLINE_DPO_TEST_UNSET_KEY",
                                                  "dpo.mixed_precision=no"])  # as the suite's other in-process runs
    with pytest.raises(ConfigError, match="ONLINE_DPO_TEST_UNSET_KEY is not set"):
        online_dpo.run(cfg)
