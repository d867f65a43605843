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
