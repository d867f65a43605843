"""One round's DPO update on a tiny random Llama, for tests/test_distributed.py.

Run as one process (`python tests/ddp_probe.py OUT`) or several
(`python -m torch.distributed.run --nproc_per_node 2 tests/ddp_probe.py OUT`): the same
seeded model, pairs and config either way. Three scenarios, one after the other (imports
are the slow part): "full" trains every weight, "lora" trains LoRA adapters with gradient
checkpointing, "kto" trains every weight with the KTO loss on unpaired labelled examples
(its reference point z0 is averaged over the processes). For each, every process writes its metrics to OUT/<scenario>/metrics_rank<i>.json
and the main process the final merged weights and reference log-probs to OUT/<scenario>/weights.pt.
"""

import argparse
import json
from pathlib import Path

import torch
from accelerate import Accelerator

from online_dpo.config import DPOConfig, LoRAConfig
from online_dpo.train import lora, optim
from online_dpo.train.logps import reference_logps
from online_dpo.train.packing import make_batches, make_example_batches
from online_dpo.train.update import train_round
from tests.conftest import tiny_llama

NUM_PAIRS = 14  # batches of 4, 4, 4, 2 pairs: every one splits over 2 processes


def synthetic_pairs(n: int) -> tuple[list[dict], dict[str, list[int]]]:
    """Fixed random token pairs of varied lengths; every fifth pair is a kept tie."""
    g = torch.Generator().manual_seed(1)

    def tokens() -> list[int]:
        return torch.randint(3, 64, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()

    prompt_ids = {f"p{i}": tokens() for i in range(4)}
    pairs = [{"prompt_id": f"p{i % 4}", "chosen_token_ids": tokens(), "rejected_token_ids": tokens(),
              "chosen_prob": 0.5 if i % 5 == 4 else 1.0} for i in range(n)]
    return pairs, prompt_ids


def synthetic_examples(n: int) -> tuple[list[dict], dict[str, list[int]]]:
    """The chosen and rejected responses of `synthetic_pairs`, unpaired: desirable and undesirable."""
    pairs, prompt_ids = synthetic_pairs(n // 2)
    examples = [{"prompt_id": p["prompt_id"], "completion_token_ids": p[key], "label": key == "chosen_token_ids"}
                for p in pairs for key in ("chosen_token_ids", "rejected_token_ids")]
    return examples, prompt_ids


def run_scenario(accelerator: Accelerator, scenario: str, out: Path) -> None:
    use_lora, kto = scenario == "lora", scenario == "kto"
    out.mkdir(parents=True, exist_ok=True)
    model = tiny_llama(0)
    cfg = DPOConfig(beta=0.5, learning_rate=1e-3, epochs=2, batch_size=4, grad_accum_steps=2, warmup_steps=1,
                    lr_schedule="cosine", rpo_alpha=0.0 if kto else 0.2, mixed_precision="no",
                    gradient_checkpointing=use_lora, loss="kto" if kto else "sigmoid")
    if use_lora:
        model = lora.wrap_lora(model, LoRAConfig(r=4, alpha=8))
        with torch.no_grad():  # B starts at 0; make the adapter do something from step 0
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    if cfg.gradient_checkpointing:
        optim.enable_gradient_checkpointing(model)
    if kto:
        examples, prompt_ids = synthetic_examples(NUM_PAIRS)
        batches, _ = make_example_batches(examples, prompt_ids, batch_size=cfg.batch_size, max_length=cfg.max_length, pad_id=0, seed=5,
                                           num_processes=accelerator.num_processes)
    else:
        pairs, prompt_ids = synthetic_pairs(NUM_PAIRS)
        batches, _ = make_batches(pairs, prompt_ids, batch_size=cfg.batch_size, max_length=cfg.max_length, pad_id=0, seed=5, num_processes=accelerator.num_processes)
    optimizer = optim.build_optimizer(model, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    ref = reference_logps(model, batches, accelerator)
    metrics = train_round(model, optimizer, batches, ref, cfg, accelerator)

    (out / f"metrics_rank{accelerator.process_index}.json").write_text(json.dumps(metrics))
    full_state = accelerator.get_state_dict(model)  # on every process (a collective under FSDP)
    if accelerator.is_main_process:
        torch.save({"weights": dict(lora.merged_weights(accelerator.unwrap_model(model), full_state)),
                    "ref": ref, "processes": accelerator.num_processes}, out / "weights.pt")
    accelerator.wait_for_everyone()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    args = parser.parse_args()
    accelerator = Accelerator(cpu=True)
    for name in ("full", "lora", "kto"):
        run_scenario(accelerator, name, Path(args.out) / name)


if __name__ == "__main__":
    main()
