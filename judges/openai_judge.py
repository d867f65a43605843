"""LLM-as-judge over any OpenAI-compatible API (OpenAI, a vLLM server, ...).

What it guarantees:
- every request is judged in both orders (A/B then B/A) unless told otherwise; agreeing
  verdicts count, disagreeing ones become ties (or are dropped), and the position
  consistency rate is kept in `stats`;
- a reply that cannot be parsed, a timeout, or an HTTP failure after the client's own
  retries (which back off and honour 429 Retry-After) is an *error*: never a win or a loss;
- replies are cached on disk by everything that can change them: the endpoint (base URL), the
  model name and what the endpoint serves under it (a vLLM server's model path), the template
  hash, the sampling settings and the prompt with both responses in order. Re-running or
  resuming a round sends no request twice; another server, or another model behind the same
  name, is asked afresh. `cache=False` (a campaign's `judge.cache=off`) asks every time;
- tokens and cost are counted from the API's usage fields and a price table, and a
  budget (cost or calls) stops the campaign with `BudgetExceeded` rather than guessing;
- the API key is read from the environment variable named in the config and is never
  stored in a record, the cache, the run directory or a log line.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Literal, Sequence

from openai import APIConnectionError

from judges.base import BudgetExceeded, JudgeUnreachable, MissingAPIKey, PairwiseItem, PointwiseItem, Score, Usage, Verdict
from judges.cache import JudgeCache, cache_root, request_key
from judges.llm_judge import BothOrders, JudgeStats, Reply, parse_choice, parse_rating, prob_first_from_top
from judges.templates import load_template

__all__ = ["BudgetExceeded", "MissingAPIKey", "OpenAIJudge", "OpenAIRubricScorer", "parse_choice"]


def default_cache_path() -> Path:
    return cache_root() / "judge_cache.sqlite"


class OpenAIClient:
    """The transport: concurrent, cached, budgeted chat requests to one model."""

    def __init__(self, model: str, base_url: str | None = None, api_key_env: str | None = "OPENAI_API_KEY",
                 max_concurrency: int = 8, timeout_s: float = 60.0, max_retries: int = 5,
                 temperature: float = 0.0, max_tokens: int = 4, top_logprobs: int = 5,
                 price_per_million_input: float = 0.0, price_per_million_output: float = 0.0,
                 max_cost: float | None = None, max_calls: int | None = None, cache_path: str | None = None,
                 cache: bool = True, judge_name: str = "openai"):
        from openai import AsyncOpenAI

        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise MissingAPIKey(
                    f"judge {judge_name!r} reads its API key from the environment variable {api_key_env}, which "
                    f"is not set. Export it (export {api_key_env}=...), or for a local server that needs no key "
                    f"set judge.options.api_key_env to null."
                )
        else:
            key = "EMPTY"  # local OpenAI-compatible servers accept any key
        self.model = model
        self.base_url = base_url
        self.judge_name = judge_name
        # The address the client really calls: the openai package falls back on OPENAI_BASE_URL, then OpenAI's.
        self.endpoint = (base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1").rstrip("/")
        self._served: str | None = None  # what the endpoint serves under `model`, asked once (served_model)
        self.max_concurrency = max_concurrency
        self.sampling = {"temperature": temperature, "max_tokens": max_tokens, "top_logprobs": top_logprobs}
        self.prices = (price_per_million_input / 1e6, price_per_million_output / 1e6)
        self.max_cost, self.max_calls = max_cost, max_calls
        self.cache = JudgeCache(cache_path or default_cache_path()) if cache else None
        self.stats = JudgeStats()
        # The key lives only in these client arguments; it is never put in a record or a log line.
        self._client_args = {"api_key": key, "base_url": base_url, "max_retries": max_retries, "timeout": timeout_s}
        self._client_factory = AsyncOpenAI

    def __repr__(self) -> str:  # no key in reprs, tracebacks or logs
        return f"OpenAIClient(model={self.model!r}, base_url={self.base_url!r})"

    def ask(self, prompts: list[str], template_sha: str) -> list[Reply]:
        return asyncio.run(self._ask_all(prompts, template_sha))

    async def _ask_all(self, prompts: list[str], template_sha: str) -> list[Reply]:
        client = self._client_factory(**self._client_args)
        if self.cache is not None and self._served is None:
            try:
                self._served = await self.served_model(client)
            except APIConnectionError:  # the requests below fail too, each a counted error
                pass
        sem = asyncio.Semaphore(self.max_concurrency)
        # Identical requests in one batch (e.g. two candidates that wrote the same text) are
        # sent once: the cache only helps once a reply is in, and they would all be in flight.
        unique = list(dict.fromkeys(prompts))
        try:
            # return_exceptions: let every in-flight request finish (and be cached) before a
            # BudgetExceeded propagates, so nothing already paid for is lost.
            replies = await asyncio.gather(*(self._ask_one(client, sem, p, template_sha) for p in unique),
                                           return_exceptions=True)
        finally:
            await client.close()
        for r in replies:
            if isinstance(r, BaseException):
                raise r
        reply_of = dict(zip(unique, replies))
        out, seen = [], set()
        for p in prompts:
            reply = reply_of[p]
            if p in seen:  # a copy of a reply already counted: no usage of its own
                self.stats.cache_hits += 1
                reply = Reply(reply.text, reply.prob_first, Usage(latency_s=0.0), reply.error)
            seen.add(p)
            out.append(reply)
        return out

    async def served_model(self, client) -> str:
        """What the endpoint lists under this model name, for the cache key: a vLLM server's model
        path (`root`), which changes when another model is served under the same name; '' where
        the endpoint does not list its models (its replies are then keyed by the name alone)."""
        try:
            page = await client.with_options(max_retries=0).models.list()
        except APIConnectionError:
            raise  # nothing answers there: not a question of its listing
        except Exception:  # noqa: BLE001 - an endpoint without /models: keyed by name alone
            return ""
        entry = next((m for m in page.data if m.id == self.model), None)
        if entry is None:
            return ""
        # Not `created`: vLLM stamps each listing with the time of the request.
        return json.dumps({"root": getattr(entry, "root", None), "owned_by": getattr(entry, "owned_by", None)})

    def check_reachable(self) -> None:
        """Raise JudgeUnreachable where nothing answers at the endpoint (a server not started, a
        wrong base_url), so a campaign stops before it loads a model rather than at its first
        round's judging; an answer of any kind (a 404 or 401 included) passes."""
        async def ask() -> str:
            client = self._client_factory(**self._client_args)
            try:
                return await self.served_model(client)
            finally:
                await client.close()

        try:
            self._served = asyncio.run(ask())
        except APIConnectionError as e:
            raise JudgeUnreachable(f"judge {self.judge_name!r} cannot reach its endpoint {self.endpoint} "
                                   f"({type(e).__name__}: {e}); start the server there (a local one: the command in "
                                   f"the config's header) or point judge.options.base_url at one that runs") from None

    def cache_key(self, prompt_text: str, template_sha: str) -> str:
        return request_key(endpoint=self.endpoint, model=self.model, served=self._served or "",
                           template=template_sha, sampling=self.sampling, prompt=prompt_text)

    async def _ask_one(self, client, sem: asyncio.Semaphore, prompt_text: str, template_sha: str) -> Reply:
        key = self.cache_key(prompt_text, template_sha)
        cached = self.cache.get(key) if self.cache is not None else None
        if cached is not None:
            self.stats.cache_hits += 1
            return Reply(cached["text"], cached["prob_first"], Usage(latency_s=0.0))
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
                return Reply(error=f"{kind}: {str(e)[:200]}")
            latency = time.perf_counter() - t0
        try:
            choice = resp.choices[0]
            text = choice.message.content or ""
        except (AttributeError, IndexError, TypeError) as e:
            self.stats.errors["malformed_response"] += 1
            return Reply(error=f"malformed_response: {e}")
        usage = Usage(calls=1, latency_s=latency)
        if resp.usage is not None:
            usage.prompt_tokens = resp.usage.prompt_tokens or 0
            usage.completion_tokens = resp.usage.completion_tokens or 0
            usage.cost = usage.prompt_tokens * self.prices[0] + usage.completion_tokens * self.prices[1]
        self.stats.prompt_tokens += usage.prompt_tokens
        self.stats.completion_tokens += usage.completion_tokens
        self.stats.cost += usage.cost
        prob = _prob_first(choice)
        if self.cache is not None:
            self.cache.put(key, {"text": text, "prob_first": prob})
        return Reply(text, prob, usage)


class OpenAIJudge:
    """Pairwise LLM-as-judge over an OpenAI-compatible API, both orders by default."""

    name = "openai"
    remote = True  # waits on an API: the campaign judges while it generates (judge.overlap_generation)
    caches_replies = True  # takes cache=False (judge.cache=off)

    def __init__(self, model: str, template: str | None = None, both_orders: bool = True,
                 on_disagreement: Literal["tie", "drop"] = "tie", **client_options):
        self.client = OpenAIClient(model, judge_name=self.name, **client_options)
        self.stats = self.client.stats
        self.protocol = BothOrders(self.stats, template, both_orders, on_disagreement)
        self.model = model

    def __repr__(self) -> str:
        return f"OpenAIJudge(model={self.model!r}, base_url={self.client.base_url!r})"

    @property
    def both_orders(self) -> bool:
        return self.protocol.both_orders

    def check_reachable(self) -> None:
        self.client.check_reachable()

    def compare(self, items: Sequence[PairwiseItem]) -> list[Verdict]:
        return self.protocol.compare(items, self.client.ask)

    def compare_as_shown(self, items: Sequence[PairwiseItem]) -> list[Verdict]:
        return self.protocol.compare(items, self.client.ask, both_orders=False)

    def combine_orders(self, shown: Verdict, reversed_back: Verdict) -> Verdict:
        return self.protocol.combine(shown, reversed_back)


class OpenAIRubricScorer:
    """Pointwise 1-10 rubric over an OpenAI-compatible API; a reply without a rating is an error."""

    name = "openai_rubric"
    remote = True  # waits on an API: the campaign judges while it generates (judge.overlap_generation)
    caches_replies = True  # takes cache=False (judge.cache=off)

    def __init__(self, model: str, template: str = "pointwise", max_tokens: int = 3, **client_options):
        self.client = OpenAIClient(model, judge_name=self.name, max_tokens=max_tokens, **client_options)
        self.stats = self.client.stats
        self.template = load_template(template, ("prompt", "response"))

    def check_reachable(self) -> None:
        self.client.check_reachable()

    def score(self, items: Sequence[PointwiseItem]) -> list[Score]:
        texts = [self.template.render(prompt=it.prompt, response=it.response) for it in items]
        out = []
        for reply in self.client.ask(texts, self.template.sha):
            if reply.error:
                out.append(Score(None, error=reply.error, usage=reply.usage))
                continue
            rating = parse_rating(reply.text)
            if rating is None:
                self.stats.errors["unparseable"] += 1
                out.append(Score(None, error=f"unparseable: judge replied {reply.text[:80]!r}", raw=reply.text))
            else:
                out.append(Score(float(rating), raw=reply.text, usage=reply.usage))
        return out


def _prob_first(choice) -> float | None:
    try:
        top = choice.logprobs.content[0].top_logprobs
    except (AttributeError, IndexError, TypeError):
        return None
    return prob_first_from_top([(e.token, e.logprob) for e in top or []])
