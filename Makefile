# Front door. `make figures` and `make test` set everything up on a fresh machine by themselves.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PRESET ?= smoke
ARGS   ?=

.PHONY: venv test figures bench clean help

help:
	@echo "make figures   build the world, fit + score, run the notebooks headlessly -> figures/ (PRESET=$(PRESET))"
	@echo "make test      run the test suite (fast, CPU only)"
	@echo "make bench     benchmarks: kit vs kronfluence, scoring pass vs plain forward+backward"

$(STAMP): requirements.txt requirements-peers.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -r requirements-peers.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

test: venv
	$(BIN)/python -m pytest -q tests

figures: venv
	$(BIN)/python -m kit figures --preset $(PRESET) $(ARGS)

bench: venv
	$(BIN)/python benchmarks/bench_ekfac.py

clean:
	rm -rf data/smoke data/runs figures/executed figures/*.png figures/*.pdf
