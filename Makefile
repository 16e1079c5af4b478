# Two commands do everything: `make demo` and `make test`. Set-up is idempotent.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel of torch for this kind of machine; on a GPU box use e.g. `make TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.ringattn-installed

.PHONY: demo test test-slow test-multihost test-all test-cuda fuzz lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ringattn demo

test: $(STAMP)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest -m "not slow and not multihost" -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow -q

# Hosts simulated by network namespaces (needs root; skips with the reason otherwise).
test-multihost: $(STAMP)
	$(BIN)/python -m pytest -m multihost -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

# 10,000 random valid and 10,000 invalid cases against float64 (CI runs a fixed-seed few).
fuzz: $(STAMP)
	RINGATTN_FUZZ_EXAMPLES=$${RINGATTN_FUZZ_EXAMPLES:-10000} $(BIN)/python -m pytest tests/test_fuzz.py -q -s --hypothesis-show-statistics

# On a GPU machine: `make TORCH_SPEC=torch test-cuda` (or scripts/device-check.sh without a venv).
test-cuda: $(STAMP)
	$(BIN)/python -m pytest -m cuda -q

bench: $(STAMP)
	$(BIN)/ringattn bench --quick

lint: $(STAMP)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m ruff format --check .

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
