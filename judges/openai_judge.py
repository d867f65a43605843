"""LLM-as-judge over any OpenAI-compatible API (OpenAI, a vLLM server, ...).

What it guarantees:
- every request is judged in both orders (A/B then B/A) unless told otherwise; agreeing
  verdicts count, disagreeing ones become ties (or are dropped), and the position
  consistency rate is kept in `stats`;
- a reply that cannot be parsed, a timeout, or an HTTP failure after the client's own
  retries (which back off and honour 429 Retry-After) is an *error*: never a win or a loss;
- replies are cached on disk by (model, template hash, sampling, prompt, both responses
  in order): re-running or resuming a round sends no request twice;
- tokens and cost are counted from the API's usage fields and a price table, and a
  budget (cost or calls) stops the campaign with `BudgetExceeded` rather than guessing;
- the API key is read from the environment variable named in the config and is never
  stored in a record, the cache, the run directory or a log line.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from judges.base import PairwiseItem, Usage, Verdict
from judges.cache import JudgeCache, request_key
from judges.templates import load_template


class MissingAPIKey(RuntimeError):
    pass


class BudgetExceeded(RuntimeError):
    pass


_VERDICT = re.compile(r"^\W*(A|B|TIE)\b", re.IGNORECASE)


def parse_choice(text: str) -> str | None:
    """'A', 'B' or 'tie' from the judge's reply, or None when the reply says neither."""
    m = _VERDICT.match(text or "")
    if not m:
        return None
    word = m.group(1).upper()
    return "tie" if word == "TIE" else word.lower()


def default_cache_path() -> Path:
    root = os.environ.get("ONLINE_DPO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "online-dpo")
    return Path(root) / "judge_cache.sqlite"


@dataclass
class JudgeStats:
    requests: int = 0  # sent to the API
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    consistent: int = 0  # both orders agreed
    inconsistent: int = 0  # both orders answered but disagreed
    errors: Counter = field(default_factory=Counter)  # kind -> count

    @property
    def consistency_rate(self) -> float:
        n = self.consistent + self.inconsistent
        return self.consistent / n if n else math.nan

    def as_dict(self) -> dict:
        return {"requests": self.requests, "cache_hits": self.cache_hits, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "cost": self.cost,
                "position_consistency": self.consistency_rate, "consistent": self.consistent,
                "inconsistent": self.inconsistent, "errors": dict(self.errors)}


@dataclass
class _Reply:
    text: str | None = None
    prob_first: float | None = None  # P("A") / (P("A") + P("B")) from the first token's top log-probs
    usage: Usage | None = None
    error: str | None = None  # "kind: detail"


class OpenAIJudge:
    name = "openai"

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str | None = "OPENAI_API_KEY",
        template: str | None = None,
        both_orders: bool = True,
        on_disagreement: Literal["tie", "drop"] = "tie",
        max_concurrency: int = 8,
        timeout_s: float = 60.0,
        max_retries: int = 5,
        temperature: float = 0.0,
        max_tokens: int = 4,
        top_logprobs: int = 5,
        price_per_million_input: float = 0.0,
        price_per_million_output: float = 0.0,
        max_cost: float | None = None,
        max_calls: int | None = None,
        cache_path: str | None = None,
    ):
        from openai import AsyncOpenAI

        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise MissingAPIKey(
                    f"judge 'openai' reads its API key from the environment variable {api_key_env}, which is "
                    f"not set. Export it (export {api_key_env}=...), or for a local server that needs no key "
                    f"set judge.options.api_key_env to null."
                )
        else:
            key = "EMPTY"  # local OpenAI-compatible servers accept any key
        if on_disagreement not in ("tie", "drop"):
            raise ValueError("on_disagreement must be 'tie' or 'drop'")
        self.model = model
        self.both_orders = both_orders
        self.on_disagreement = on_disagreement
        self.max_concurrency = max_concurrency
        self.sampling = {"temperature": temperature, "max_tokens": max_tokens, "top_logprobs": top_logprobs}
        self.prices = (price_per_million_input / 1e6, price_per_million_output / 1e6)
        self.max_cost, self.max_calls = max_cost, max_calls
        self.pair_template = load_template(template, ("prompt", "response_a", "response_b")) if template else None
        self.ref_template = load_template("pairwise_reference", ("prompt", "response_a", "response_b", "reference"))
        self.default_template = load_template("pairwise", ("prompt", "response_a", "response_b"))
        self.cache = JudgeCache(cache_path or default_cache_path())
        self.stats = JudgeStats()
        # The key lives only inside the client object; it is never put in a record or a log line.
        self._client_args = {"api_key": key, "base_url": base_url, "max_retries": max_retries, "timeout": timeout_s}
        self._client_factory = AsyncOpenAI

    def __repr__(self) -> str:  # no key in reprs, tracebacks or logs
        return f"OpenAIJudge(model={self.model!r}, base_url={self._client_args['base_url']!r})"

    # --- one request ------------------------------------------------------------------

    async def _ask(self, client, sem: asyncio.Semaphore, prompt_text: str, template_sha: str) -> _Reply:
        key = request_key(model=self.model, template=template_sha, sampling=self.sampling, prompt=prompt_text)
        cached = self.cache.get(key)
        if cached is not None:
            self.stats.cache_hits += 1
            return _Reply(cached["text"], cached["prob_first"], Usage(latency_s=0.0))
        async with sem:
            if self.max_calls is not None and self.stats.requests >= self.max_calls:
                raise BudgetExceeded(f"judge budget reached: {self.stats.requests} calls of max_calls={self.max_calls}")
            if self.max_cost is not None and self.stats.cost >= self.max_cost:
                raise BudgetExceeded(f"judge budget reached: cost {self.stats.cost:.4f} of max_cost={self.max_cost}")
            self.stats.requests += 1
            t0 = time.perf_counter()
            try:
                resp = await client.chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": prompt_text}],
                    temperature=self.sampling["temperature"], max_tokens=self.sampling["max_tokens"],
                    logprobs=self.sampling["top_logprobs"] > 0,
                    top_logprobs=self.sampling["top_logprobs"] or None,
                )
            except Exception as e:  # after the client's own retries
                kind = type(e).__name__
                self.stats.errors[kind] += 1
                return _Reply(error=f"{kind}: {str(e)[:200]}")
            latency = time.perf_counter() - t0
        try:
            choice = resp.choices[0]
            text = choice.message.content or ""
        except (AttributeError, IndexError, TypeError) as e:
            self.stats.errors["malformed_response"] += 1
            return _Reply(error=f"malformed_response: {e}")
        usage = Usage(calls=1, latency_s=latency)
        if resp.usage is not None:
            usage.prompt_tokens = resp.usage.prompt_tokens or 0
            usage.completion_tokens = resp.usage.completion_tokens or 0
            usage.cost = usage.prompt_tokens * self.prices[0] + usage.completion_tokens * self.prices[1]
        self.stats.prompt_tokens += usage.prompt_tokens
        self.stats.completion_tokens += usage.completion_tokens
        self.stats.cost += usage.cost
        prob = _prob_first(choice)
        self.cache.put(key, {"text": text, "prob_first": prob})
        return _Reply(text, prob, usage)

    # --- pairwise ---------------------------------------------------------------------

    def _render(self, it: PairwiseItem, first: str, second: str) -> tuple[str, str]:
        tpl = self.pair_template or (self.ref_template if it.reference is not None else self.default_template)
        fields = {"prompt": it.prompt, "response_a": first, "response_b": second}
        if it.reference is not None and "{reference}" in tpl.text:
            fields["reference"] = it.reference
        return tpl.render(**fields), tpl.sha

    async def _compare_all(self, items: Sequence[PairwiseItem]) -> list[Verdict]:
        client = self._client_factory(**self._client_args)
        sem = asyncio.Semaphore(self.max_concurrency)
        try:
            jobs = []
            for it in items:
                jobs.append(self._ask(client, sem, *self._render(it, it.response_a, it.response_b)))
                if self.both_orders:
                    jobs.append(self._ask(client, sem, *self._render(it, it.response_b, it.response_a)))
            # return_exceptions: let every in-flight request finish (and be cached) before a
            # BudgetExceeded propagates, so nothing already paid for is lost.
            replies = await asyncio.gather(*jobs, return_exceptions=True)
        finally:
            await client.close()
        for r in replies:
            if isinstance(r, BaseException):
                raise r
        step = 2 if self.both_orders else 1
        return [self._combine(replies[i : i + step]) for i in range(0, len(replies), step)]

    def _single(self, reply: _Reply, swapped: bool) -> Verdict:
        if reply.error:
            return Verdict.failed(reply.error, usage=reply.usage)
        choice = parse_choice(reply.text)
        if choice is None:
            self.stats.errors["unparseable"] += 1
            return Verdict.failed(f"unparseable: judge replied {reply.text[:80]!r}", raw=reply.text, usage=reply.usage)
        prob = reply.prob_first
        if swapped:
            choice = {"a": "b", "b": "a", "tie": "tie"}[choice]
            prob = None if prob is None else 1.0 - prob
        return Verdict(choice, prob_a=prob, raw=reply.text, usage=reply.usage)

    def _combine(self, replies: list[_Reply]) -> Verdict:
        first = self._single(replies[0], swapped=False)
        if not self.both_orders:
            return first
        second = self._single(replies[1], swapped=True)
        usage = _sum_usage(first.usage, second.usage)
        raw = f"AB: {first.raw!r} | BA: {second.raw!r}"
        if first.error or second.error:
            reasons = "; ".join(v.error for v in (first, second) if v.error)
            return Verdict.failed(reasons, raw=raw, usage=usage)
        probs = [p for p in (first.prob_a, second.prob_a) if p is not None]
        prob = sum(probs) / len(probs) if probs else None
        if first.winner == second.winner:
            self.stats.consistent += 1
            return Verdict(first.winner, prob_a=prob, raw=raw, usage=usage)
        self.stats.inconsistent += 1
        if self.on_disagreement == "drop":
            self.stats.errors["position_inconsistent"] += 1
            return Verdict.failed("position_inconsistent: the verdict flipped with the order", raw=raw, usage=usage)
        return Verdict("tie", prob_a=prob, raw=raw, usage=usage)

    def compare(self, items: Sequence[PairwiseItem]) -> list[Verdict]:
        return asyncio.run(self._compare_all(items))


def _prob_first(choice) -> float | None:
    """P(A) / (P(A) + P(B)) over the first generated token's top log-probs, if returned."""
    try:
        top = choice.logprobs.content[0].top_logprobs
    except (AttributeError, IndexError, TypeError):
        return None
    mass = {"a": 0.0, "b": 0.0}
    for entry in top or []:
        tok = (entry.token or "").strip().lower()
        if tok in mass:
            mass[tok] += math.exp(entry.logprob)
    total = mass["a"] + mass["b"]
    return mass["a"] / total if total > 0 else None


def _sum_usage(*usages: Usage | None) -> Usage:
    out = Usage()
    for u in usages:
        if u is not None:
            out.prompt_tokens += u.prompt_tokens
            out.completion_tokens += u.completion_tokens
            out.cost += u.cost
            out.latency_s = max(out.latency_s, u.latency_s)
            out.calls += u.calls
    return out
