"""The generation backend's HTTP connections to a server (engines.server.Server), against a
small local HTTP server that misbehaves on purpose: a request the server resets unanswered is
sent once more, a server that resets every request is named in the error, idle pooled
connections are dropped well before a server would close them, and every request carries the
servers' API key where servers.api_key_env names one."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from online_dpo.engines.server import IDLE_CONNECTION_S, Server, ServerGenerator
from online_dpo.engines.transports import DiskTransport, ServerWeightSyncClient
from online_dpo.errors import ConfigError, GenerationServerError
from tests.local_http import LocalHTTPServer, QuietHandler

ANSWER = {"choices": [{"token_ids": [1, 2, 3]}]}


class ResettingServer(LocalHTTPServer):
    """Answers POSTs with ANSWER, except the first `resets` requests: those it reads and then
    drops with a TCP reset, as a server closing a keep-alive connection at that moment does.
    Records the client port of every request."""

    def __init__(self, resets: int):
        owner = self
        self.resets, self.client_ports = resets, []

        class Handler(QuietHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                owner.client_ports.append(self.client_address[1])
                if len(owner.client_ports) > owner.resets:
                    self.send_json(ANSWER)
                    return
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True

        super().__init__(Handler)


@pytest.fixture
def server_that_resets():
    made = []

    def make(resets: int) -> ResettingServer:
        made.append(ResettingServer(resets))
        return made[-1]

    yield make
    for s in made:
        s.close()


def test_a_request_the_server_reset_unanswered_is_sent_again(server_that_resets):
    fault = server_that_resets(resets=1)
    assert Server(fault.url, timeout_s=10).generate([5, 6], {"n": 1}) == ANSWER
    assert len(fault.client_ports) == 2


def test_a_server_that_resets_every_request_is_named_in_the_error(server_that_resets):
    fault = server_that_resets(resets=100)
    with pytest.raises(GenerationServerError, match=rf"generation server {fault.url}.*cannot reach it"):
        Server(fault.url, timeout_s=10).generate([5, 6], {"n": 1})
    assert len(fault.client_ports) == 2  # one more try, not a loop


def test_idle_connections_are_dropped_before_a_server_closes_them(server_that_resets):
    """vLLM's server closes a connection idle for 5 s (VLLM_HTTP_TIMEOUT_KEEP_ALIVE): the pool
    reuses a connection within IDLE_CONNECTION_S and opens a new one after it."""
    assert IDLE_CONNECTION_S < 5
    fault = server_that_resets(resets=0)
    server = Server(fault.url, timeout_s=10)
    server.generate([1], {})
    server.generate([1], {})
    time.sleep(IDLE_CONNECTION_S + 0.5)
    server.generate([1], {})
    first, reused, after_idle = fault.client_ports
    assert reused == first and after_idle != first


KEY = "s3cret-for-tests"


class KeyedServer(LocalHTTPServer):
    """Answers every GET and POST that carries `Authorization: Bearer KEY` (with what the
    generator reads: routes, models, a weight version), and 401 to any other, as a server from
    `online-dpo serve` with a key does. Records each request's method, path and header."""

    def __init__(self):
        owner = self
        self.requests: list[tuple[str, str, str | None]] = []

        class Handler(QuietHandler):
            def answer(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                auth = self.headers.get("Authorization")
                owner.requests.append((self.command, self.path.split("?")[0], auth))
                if auth != f"Bearer {KEY}":
                    self.send_json({"error": "Unauthorized"}, status=401)
                else:
                    self.send_json({"paths": {}, "data": [{"id": "m"}], "weight_version": "t/v1"})

            do_GET = do_POST = answer

        super().__init__(Handler)


@pytest.fixture
def keyed_server():
    server = KeyedServer()
    yield server
    server.close()


def generator(url: str, api_key_env: str | None, tmp_path) -> ServerGenerator:
    return ServerGenerator([url], None, DiskTransport(tmp_path), probe_policy=lambda: None, tolerance=0.1,
                           label_prefix="t/", timeout_s=10, api_key_env=api_key_env)


def test_every_request_to_a_keyed_server_carries_the_key(keyed_server, monkeypatch, tmp_path):
    monkeypatch.setenv("TEST_SERVER_KEY", KEY)
    gen = generator(keyed_server.url, "TEST_SERVER_KEY", tmp_path)
    server = gen.servers[0]
    server.routes(), server.served_model(), server.weight_version(), server.generate([1, 2], {"n": 1})
    gen.label("v1")
    server.pause(), server.reload_from("/weights/v2"), server.commit("t/v2"), server.resume()
    nccl = ServerWeightSyncClient(server)  # vLLM's NCCL engine drives the weight-sync control plane through it
    nccl.init_weight_transfer_engine({"master_port": 1}), nccl.start_weight_update()
    nccl.update_weights({"names": ["w"]}), nccl.finish_weight_update("t/v2"), nccl.shutdown_weight_transfer_engine()
    paths = [path for _, path, _ in keyed_server.requests]
    assert paths == ["/openapi.json", "/v1/models", "/weight_info", "/inference/v1/generate", "/update_weight_version",
                     "/pause", "/collective_rpc", "/reset_prefix_cache", "/update_weight_version", "/resume",
                     "/init_weight_transfer_engine", "/start_weight_update", "/update_weights",
                     "/finish_weight_update", "/shutdown_weight_transfer_engine"]
    assert {auth for _, _, auth in keyed_server.requests} == {f"Bearer {KEY}"}


def test_a_key_missing_or_refused_is_named_and_never_shown(keyed_server, monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match=r"servers.api_key_env=TEST_SERVER_KEY .* TEST_SERVER_KEY is not set"):
        generator(keyed_server.url, "TEST_SERVER_KEY", tmp_path)
    with pytest.raises(GenerationServerError, match=r"/pause answered HTTP 401: .* none was sent: set "
                                                    r"servers.api_key_env"):
        generator(keyed_server.url, None, tmp_path).servers[0].pause()
    monkeypatch.setenv("TEST_SERVER_KEY", KEY + "-old")
    with pytest.raises(GenerationServerError, match=r"HTTP 401: .* refused the one in servers.api_key_env") as refused:
        generator(keyed_server.url, "TEST_SERVER_KEY", tmp_path).servers[0].pause()
    assert KEY not in str(refused.value)
    assert [auth for _, _, auth in keyed_server.requests] == [None, f"Bearer {KEY}-old"]
