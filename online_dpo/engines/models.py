"""Loading the policy and its tokenizer from a local model folder (`judges.models` turns a
model name, such as "embedded", into one)."""

from __future__ import annotations

from judges.models import ModelError


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        raise ModelError(f"the tokenizer at {path} has no chat template; online-dpo needs a chat model")
    return tok


def load_policy(path: str, dtype: str = "float32"):
    """The trainable policy. Master weights stay fp32; mixed precision is applied by autocast."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    model.config.use_cache = False
    return model
