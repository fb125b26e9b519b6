# pdserve: `make serve` and `make test` set up .venv/ on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU-only machines pin the local CPU torch wheel; GPU machines keep their CUDA torch.
CONSTRAINTS := $(shell command -v nvidia-smi >/dev/null 2>&1 || echo "-c constraints/cpu.txt")
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup serve test fuzz lint format clean redis

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

test: setup redis
	$(BIN)/python -m pytest -q

# The fuzz suite alone with long example budgets and random seeds (tests/fuzzing.py).
fuzz: setup redis
	PDSERVE_FUZZ=long $(BIN)/python -m pytest -q -k fuzz --timeout 3600

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache
