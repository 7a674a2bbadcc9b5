# Two entry points (see README): `make sweep` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/engram-sweep: requirements.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

setup: $(BIN)/engram-sweep

sweep: setup
	$(BIN)/engram-sweep run sweep.yaml
	$(BIN)/engram-sweep report results/default

test: setup
	$(BIN)/python -m pytest -q

.PHONY: setup sweep test
