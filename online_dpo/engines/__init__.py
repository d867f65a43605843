"""Generation engines (the `Generator` protocol: vLLM in-process, HF `generate`) and model loading."""
