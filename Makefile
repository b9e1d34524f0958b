# `make test` and `make demo` each create .venv and install what they need, at the versions in
# requirements/lock.txt: what the suite last passed with, not whatever was released since.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch 2.13.0 is the CPU build on local disk here; elsewhere pip fetches it from PyPI. It must agree
# with the lock's torch pin (tests/test_lock.py checks the default).
TORCH ?= torch==2.13.0
EXTRAS := worker,embedded,http,test,lint
# A constraints file, not a requirements file: it pins versions without adding packages, so the same
# lock serves every extra and every image, and a package that only another platform needs (the
# lock is resolved on Linux, CPython 3.11) still installs, unpinned. queuebert, and several of the
# lock's pins, need Python 3.11+.
LOCK := requirements/lock.txt

.PHONY: install test lint demo bench clean lock install-latest test-latest

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "$(LOCK) needs Python 3.11+")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c $(LOCK) "$(TORCH)"
	$(BIN)/pip install -q -c $(LOCK) -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# Style, imports and likely bugs (ruff), then types (mypy): both configured in pyproject.toml; seconds
# once mypy's cache (.mypy_cache) is warm, about half a minute from cold.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

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

# Regenerate the lock: the newest versions pyproject.toml allows, torch at $(TORCH). pip-tools runs
# in a throwaway venv (it is no dependency of queuebert). pip-compile keeps the pins already in the
# lock unless told to upgrade: `make lock LOCK_ARGS=` adds a new dependency without moving the rest.
# Run `make test-latest` first, and commit the lock only after it passes. TORCH comes in on stdin
# ("-r -"). The sed drops torch's local label (2.13.0+cpu here): it names a build only its own index
# has, while the bare version admits every build of 2.13.0 (PEP 440), so CPU and CUDA installs both
# satisfy the lock. Resolved against the CPU build, the lock leaves out the CUDA build's own packages
# (cuda-toolkit, nvidia-*, triton): torch's metadata pins those exactly, cuda-bindings to a range.
LOCK_VENV := .venv-lock
LOCK_TOOLS ?= pip==26.3 pip-tools==7.7.0
LOCK_ARGS ?= --upgrade
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q $(LOCK_TOOLS)
	mkdir -p $(dir $(LOCK))
	echo "$(TORCH)" | CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile --quiet $(LOCK_ARGS) \
		--all-extras --strip-extras --allow-unsafe \
		--no-emit-index-url --no-emit-find-links --no-emit-trusted-host \
		--output-file $(LOCK) pyproject.toml -
	sed -E -e 's/^(torch==[^+ ]+)[+][^ ]+/\1/' -e 's/-r -$$/TORCH (Makefile)/' $(LOCK) > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf $(LOCK_VENV)

# The suite against the newest versions pyproject.toml allows (no lock; torch stays at $(TORCH)):
# what a fresh `pip install queuebert[...]` gets today. A new venv every time, so nothing installed
# by an earlier run stays in the way.
LATEST := .venv-latest
install-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade pip
	$(LATEST)/bin/pip install -q "$(TORCH)"
	$(LATEST)/bin/pip install -q -e ".[$(EXTRAS)]"
	$(LATEST)/bin/pip freeze --all --exclude-editable

test-latest: install-latest
	HF_HUB_OFFLINE=1 $(LATEST)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) $(LATEST) $(LOCK_VENV) demo-results.jsonl
