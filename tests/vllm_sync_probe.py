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


def main():
    from accelerate import Accelerator

    from online_dpo import dpo, lora
    from online_dpo.config import DPOConfig, GenerationConfig
    from online_dpo.data import chat_prompt_ids
    from online_dpo.generate import VLLMGenerator
    from online_dpo.models import embedded_model_dir, load_policy, load_tokenizer

    path = str(embedded_model_dir())
    tok = load_tokenizer(path)
    policy = load_policy(path)
    gen = VLLMGenerator(path, tok, GenerationConfig(dtype="float32", kv_cache_gb=0.25), max_model_len=256)

    prompt_ids = chat_prompt_ids(tok, [{"role": "user", "content": "What is 3 + 4?"}])
    completion = tok("3 + 4 = 7. The answer is 7.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    rejected = tok("I think it is 12.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    before_vllm = gen.completion_logprobs(prompt_ids, completion)
    before_torch = torch_logprobs(policy, prompt_ids, completion)

    # A real DPO update: raise the correct completion over the wrong one.
    cfg = DPOConfig(learning_rate=1e-4, epochs=1, max_steps=3, batch_size=1, mixed_precision="no")
    accelerator = Accelerator(cpu=True)
    batches = [dpo.collate_pairs([dpo.encode_pair(prompt_ids, completion, rejected, 128)], tok.pad_token_id)]
    ref = dpo.reference_logps(policy, batches, accelerator)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate)
    metrics = dpo.train_round(policy, optimizer, batches, ref, cfg, accelerator)
    gen.update_weights(lora.merged_weights(policy))

    after_vllm = gen.completion_logprobs(prompt_ids, completion)
    after_torch = torch_logprobs(policy, prompt_ids, completion)
    print(json.dumps({
        "before_vllm": before_vllm, "before_torch": before_torch,
        "after_vllm": after_vllm, "after_torch": after_torch,
        "losses": [m["loss"] for m in metrics],
    }))


if __name__ == "__main__":
    sys.exit(main())
