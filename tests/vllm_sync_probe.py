"""Run by test_weight_sync.py in a subprocess (vLLM keeps process-global state).

Loads the embedded model into torch and into an in-process vLLM engine, compares the
log-probs both assign to a fixed completion, runs a real DPO update on the torch
model, pushes the weights with `VLLMGenerator.update_weights`, and compares again.
Prints one JSON line.
"""

import json
import sys

import torch


def torch_logprobs(model, prompt_ids, completion_ids):
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    lp = torch.log_softmax(logits[0, :-1], -1)
    start = len(prompt_ids)
    return [lp[start - 1 + i, tok].item() for i, tok in enumerate(completion_ids)]


def vllm_logprobs(gen, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
    """Per-token log-probs the running vLLM engine assigns to `completion_ids` after `prompt_ids`."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    out = gen.llm.generate([{"prompt_token_ids": prompt_ids + completion_ids}], params, use_tqdm=False)[0]
    start = len(prompt_ids)
    return [out.prompt_logprobs[start + i][tok].logprob for i, tok in enumerate(completion_ids)]


def main():
    from accelerate import Accelerator

    from judges.models import embedded_model_dir
    from online_dpo.config import DPOConfig, GenerationConfig
    from online_dpo.data import chat_prompt_ids
    from online_dpo.engines.generate import VLLMGenerator
    from online_dpo.engines.models import load_policy, load_tokenizer
    from online_dpo.train import lora
    from online_dpo.train.logps import reference_logps
    from online_dpo.train.packing import collate_pairs, encode_pair
    from online_dpo.train.update import train_round

    path = str(embedded_model_dir())
    tok = load_tokenizer(path)
    policy = load_policy(path)
    gen = VLLMGenerator(path, tok, GenerationConfig(dtype="float32", kv_cache_gb=0.25), max_model_len=256)

    prompt_ids = chat_prompt_ids(tok, [{"role": "user", "content": "What is 3 + 4?"}])
    completion = tok("3 + 4 = 7. The answer is 7.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    rejected = tok("I think it is 12.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    before_vllm = vllm_logprobs(gen, prompt_ids, completion)
    before_torch = torch_logprobs(policy, prompt_ids, completion)

    # A real DPO update: raise the correct completion over the wrong one.
    cfg = DPOConfig(learning_rate=1e-4, epochs=1, max_steps=3, batch_size=1, mixed_precision="no")
    accelerator = Accelerator(cpu=True)
    batches = [collate_pairs([encode_pair(prompt_ids, completion, rejected, 128)], tok.pad_token_id)]
    ref = reference_logps(policy, batches, accelerator)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate)
    metrics = train_round(policy, optimizer, batches, ref, cfg, accelerator)
    gen.update_weights(lora.merged_weights(policy), "round-0")

    after_vllm = vllm_logprobs(gen, prompt_ids, completion)
    after_torch = torch_logprobs(policy, prompt_ids, completion)
    print(json.dumps({
        "before_vllm": before_vllm, "before_torch": before_torch,
        "after_vllm": after_vllm, "after_torch": after_torch,
        "losses": [m["loss"] for m in metrics],
    }))


if __name__ == "__main__":
    sys.exit(main())
