# `make test` and `make demo` each create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch 2.13.0 is the CPU build on local disk here; elsewhere pip fetches it from PyPI.
TORCH ?= torch==2.13.0

.PHONY: install test demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[worker,embedded,http,test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/queuebert run examples/reviews.jsonl -o demo-results.jsonl

# `make bench DEVICE=cuda` runs the GPU benchmark (benchmarks/gpu.py) on the first CUDA device.
DEVICE ?= cpu
bench: $(STAMP)
ifeq ($(DEVICE),cpu)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/run.py $(BENCH_ARGS)
else
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/gpu.py --device $(DEVICE) --bert-base $(BENCH_ARGS)
endif

clean:
	rm -rf $(VENV) demo-results.jsonl
