"""The generation backend's HTTP connections to a server (engines.server.Server), against a
small local HTTP server that misbehaves on purpose: a request the server resets unanswered is
sent once more, a server that resets every request is named in the error, and idle pooled
connections are dropped well before a server would close them."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from online_dpo.engines.server import IDLE_CONNECTION_S, Server
from online_dpo.errors import GenerationServerError
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
