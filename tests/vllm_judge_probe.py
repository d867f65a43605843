"""Run by test_vllm_judge.py in a subprocess: the in-process vLLM judge on a few pairs."""

import json

from judges import PairwiseItem, load_judge

if __name__ == "__main__":
    items = [PairwiseItem(f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", f"{a} + {b} = {a + b + 3}.", str(a + b))
             for a, b in [(2, 3), (4, 4), (1, 6), (5, 2)]]
    judge = load_judge("vllm_judge", model="embedded", max_tokens=1)
    verdicts = judge.compare(items)
    print(json.dumps({"stats": judge.stats.as_dict(), "templates": judge.protocol.templates(),
                      "verdicts": [[v.winner, v.prob_a, v.error] for v in verdicts],
                      "kv_block_tokens": judge.llm.llm_engine.vllm_config.cache_config.block_size}))
