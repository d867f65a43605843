"""A small OpenAI-compatible HTTP server that misbehaves on purpose, for fault tests.

Behaviours (set per test): "judge" answers correctly (the response containing RIGHT
wins), "shorter" prefers the shorter response (a consistent preference that real model
outputs produce pairs under), "consistent" prefers one response of every pair of different texts
whatever the order (the one whose text hashes lower: a total, arbitrary preference), "always_a" answers "A" whatever the order, "unparseable" rambles, "malformed"
returns a body that is not JSON, "hang" sleeps past the client's timeout, "noisy" is an imperfect
LLM judge of arithmetic (reference-guided template): the response whose final number matches
the reference is the better one, and `noise` (a judges.noisy.NoiseModel) flips decisive answers
and prefers the first-shown response on ties, as the in-process `noisy` judge does. `failures`
queues HTTP errors (status, headers) served before the behaviour, e.g. a 429 with
Retry-After. `models` is what GET /v1/models lists (none by default). Every request is logged with its arrival time, every answered one in `answered`.
`kill_on_request(n, pid)` SIGKILLs process `pid` when the n-th request from now arrives,
before it is answered: a client crash with no reply in flight (durability tests).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from judges.noisy import NoiseModel
from judges.verifiers import final_number


class FakeOpenAI:
    def __init__(self, behaviour: str = "judge", noise: NoiseModel | None = None):
        self.behaviour = behaviour
        self.noise = noise or NoiseModel()
        self.failures: list[tuple[int, dict]] = []
        self.requests: list[dict] = []
        self.hang_s = 3.0
        self.auth_headers: list[str] = []
        self.answered: list[dict] = []
        self.models: list[dict] | None = None  # GET /v1/models lists these; None: the endpoint has no listing (404)
        self._kill: tuple[int, int] | None = None  # (requests left before the kill, pid)
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                if self.path.rstrip("/").endswith("/models") and server.models is not None:
                    self._send(200, {"object": "list", "data": [{"object": "model", "created": int(time.time()),
                                                                 "owned_by": "fake", **m} for m in server.models]})
                else:
                    self._send(404, {"error": {"message": f"no {self.path} here"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"t": time.monotonic(), "body": body})
                server.auth_headers.append(self.headers.get("Authorization", ""))
                if server._should_kill():
                    return  # the client is dead; this request is never answered
                if server.failures:
                    status, headers = server.failures.pop(0)
                    self._send(status, {"error": {"message": "injected failure"}}, headers)
                    return
                if server.behaviour == "hang":
                    time.sleep(server.hang_s)
                if server.behaviour == "malformed":
                    self._send_raw(200, b"{this is not json")
                    return
                text = server.answer(body["messages"][-1]["content"])
                self._send(200, completion(text, body))
                server.answered.append(body)

            def _send(self, status, obj, headers=None):
                self._send_raw(status, json.dumps(obj).encode(), headers)

            def _send_raw(self, status, data, headers=None):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except BrokenPipeError:  # the client gave up (timeout tests)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def kill_on_request(self, n: int, pid: int) -> None:
        with self._lock:
            self._kill = (n, pid)

    def _should_kill(self) -> bool:
        with self._lock:
            if self._kill is None:
                return False
            left, pid = self._kill
            if left > 1:
                self._kill = (left - 1, pid)
                return False
            self._kill = None
        os.kill(pid, signal.SIGKILL)
        return True

    def answer(self, prompt: str) -> str:
        if self.behaviour == "always_a":
            return "A"
        if self.behaviour == "unparseable":
            return "Both responses have merit, hard to say."
        single = re.search(r"\[Response\]\n(.*?)\n\n", prompt, re.S)
        if single:  # pointwise rubric
            return "8" if "RIGHT" in single.group(1) else "3"
        m = re.search(r"\[Response A\]\n(.*?)\n\n\[Response B\]\n(.*?)\n\n", prompt, re.S)
        if self.behaviour == "noisy":
            return self.noisy_answer(prompt, m.group(1), m.group(2))
        if self.behaviour == "consistent":
            a, b = (hashlib.sha256(t.encode()).hexdigest() for t in (m.group(1), m.group(2)))
            return "A" if a < b else "B" if b < a else "tie"
        if self.behaviour == "shorter":
            a, b = len(m.group(1)), len(m.group(2))
            return "A" if a < b else "B" if b < a else "tie"
        return "A" if "RIGHT" in m.group(1) else "B"

    def noisy_answer(self, prompt: str, first: str, second: str) -> str:
        reference = float(re.search(r"\[Reference answer\]\n(.*?)\n\n", prompt, re.S).group(1))
        right = [final_number(text) == reference for text in (first, second)]
        better = None if right[0] == right[1] else "first" if right[0] else "second"
        return "A" if self.noise.answer(better, prompt) == "first" else "B"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def completion(text: str, body: dict) -> dict:
    logprobs = None
    if body.get("logprobs"):
        other = "B" if text == "A" else "A"
        logprobs = {"content": [{"token": text, "logprob": -0.105, "bytes": None,
                                 "top_logprobs": [{"token": text, "logprob": -0.105, "bytes": None},
                                                  {"token": other, "logprob": -2.303, "bytes": None}]}]}
    return {
        "id": "cmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": logprobs,
                     "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 1, "total_tokens": 101},
    }


class FlakyOpenAI(FakeOpenAI):
    """A FakeOpenAI whose faults are seeded and last one try each: every distinct request (its
    last message's text) fails on its first arrival with probability `rate`, drawn from
    sha256(seed, text), as one of `kinds`, and gets `behaviour`'s answer on every later arrival.
    So the same run meets the same faults, and an API client's own retries absorb them:
      "500"      HTTP 500;
      "429"      HTTP 429 with Retry-After: `retry_after` seconds;
      "hang"     the answer only after `hang_s` (set it past the client's timeout);
      "garbage"  HTTP 200 whose body is cut-off JSON, which clients do not retry: a counted error.
    `garbage_next(k)`: the next k requests not yet failed get garbage, whatever the draw (a test
    that follows them with a kill makes them transient: the resumed client asks again).
    `on_request(n, fn)` calls fn() when the n-th request from now arrives, then answers it. `served`
    counts the faults served, by kind. `failures` and `kill_on_request` work as in FakeOpenAI;
    a request answered past the client's timeout is not in `answered`."""

    KINDS = ("500", "429", "hang", "garbage")

    def __init__(self, behaviour: str = "consistent", seed: int = 0, rate: float = 0.25,
                 kinds: tuple[str, ...] = ("500", "429", "hang"), retry_after: str = "0.3", **kwargs):
        from collections import Counter

        super().__init__(behaviour, **kwargs)
        assert set(kinds) <= set(self.KINDS), kinds
        self.seed, self.rate, self.kinds, self.retry_after = seed, rate, kinds, retry_after
        self.failed: set[str] = set()  # texts whose one fault was served
        self.served: Counter[str] = Counter()
        self._garbage = 0
        self._call: tuple[int, object] | None = None  # (requests left before the call, fn)
        server, base = self, self.httpd.RequestHandlerClass

        class FlakyHandler(base):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"t": time.monotonic(), "body": body})
                server.auth_headers.append(self.headers.get("Authorization", ""))
                if server._should_kill():
                    return
                server._maybe_call()
                if server.failures:
                    status, headers = server.failures.pop(0)
                    self._send(status, {"error": {"message": "injected failure"}}, headers)
                    return
                fault = server.fault_for(body["messages"][-1]["content"])
                if fault == "500":
                    self._send(500, {"error": {"message": "injected flaky failure"}})
                    return
                if fault == "429":
                    self._send(429, {"error": {"message": "rate limited"}}, {"Retry-After": server.retry_after})
                    return
                if fault == "garbage":
                    self._send_raw(200, b'{"id": "cmpl-1", "choices": [{"message": {"content": "A')
                    return
                if fault == "hang":
                    time.sleep(server.hang_s)
                answer = completion(server.answer(body["messages"][-1]["content"]), body)
                self._send(200, answer)
                if fault is None:
                    server.answered.append(body)

        self.httpd.RequestHandlerClass = FlakyHandler

    def on_request(self, n: int, fn) -> None:
        with self._lock:
            self._call = (n, fn)

    def _maybe_call(self) -> None:
        with self._lock:
            if self._call is None:
                return
            left, fn = self._call
            self._call = (left - 1, fn) if left > 1 else None
        if left == 1:
            fn()

    def garbage_next(self, k: int) -> None:
        with self._lock:
            self._garbage = k

    def fault_for(self, text: str) -> str | None:
        """The fault this arrival of `text` gets (None: the behaviour's answer), once per text."""
        with self._lock:
            if text in self.failed:
                return None
            if self._garbage:
                self._garbage -= 1
                kind = "garbage"
            else:
                digest = hashlib.sha256(f"{self.seed}\n{text}".encode()).digest()
                if int.from_bytes(digest[:8], "big") / 2**64 >= self.rate:
                    return None
                kind = self.kinds[digest[8] % len(self.kinds)]
            self.failed.add(text)
            self.served[kind] += 1
            return kind
