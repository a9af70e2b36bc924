# The two commands: `make run` serves the demo models, `make test` runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
MODELS_DIR ?= models
HOST ?= 127.0.0.1
PORT ?= 8000
# The Open Inference Protocol over gRPC, beside HTTP; `make run GRPC_PORT=` turns it off.
GRPC_PORT ?= 8001
# Server processes for `make run`: 1 (a development server: one log, quick start, one copy of
# the models); `make run PROCESSES=0` runs one per available CPU, as production does.
PROCESSES ?= 1
BIN := $(VENV)/bin

.PHONY: lock run test lint unit integration e2e deploy promtool chromium bench models clean grpc

# Both installs come from the locks (requirements/*.txt: every package pinned, with hashes), so
# a fresh machine gets what CI tested; `make lock` refreshes them after pyproject.toml changes.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-run: requirements/run.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r requirements/run.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $@

$(VENV)/.installed-dev: requirements/dev.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r requirements/dev.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $@ $(VENV)/.installed-run

# Resolve requirements/*.txt again from pyproject.toml (uv, from the dev lock).
lock: $(VENV)/.installed-dev
	$(BIN)/python tools/lock.py refresh $(if $(UPGRADE),--upgrade)

# With torch in the venv (pip install -e '.[vision]'), the digits image model too (~10 s).
$(MODELS_DIR)/iris/1/model.joblib: | $(VENV)/.installed-run
	$(BIN)/inferd models train-demo --models-dir $(MODELS_DIR) \
	  $$($(BIN)/python -c 'import torch' 2>/dev/null && echo --vision)

models: $(MODELS_DIR)/iris/1/model.joblib

run: $(VENV)/.installed-run models
	$(BIN)/inferd serve --models-dir $(MODELS_DIR) --host $(HOST) --port $(PORT) \
	  $(if $(GRPC_PORT),--grpc-port $(GRPC_PORT)) \
	  --processes $(PROCESSES)

lint: $(VENV)/.installed-dev
	$(BIN)/python tools/lock.py check
	$(BIN)/python tools/gen_grpc.py --check
	$(BIN)/ruff check src tests bench tools
	$(BIN)/ruff format --check src tests bench tools
	$(BIN)/mypy

# The checked-in gRPC modules, generated again from src/inferd/grpc/grpc_predict_v2.proto.
grpc: $(VENV)/.installed-dev
	$(BIN)/python tools/gen_grpc.py

test: lint promtool chromium
	$(BIN)/pytest

unit integration: $(VENV)/.installed-dev
	$(BIN)/pytest tests/$@

e2e: $(VENV)/.installed-dev chromium
	$(BIN)/pytest tests/$@

deploy: $(VENV)/.installed-dev promtool
	$(BIN)/pytest tests/deploy

# tests/deploy run promtool and prometheus, from Debian's prometheus package.
promtool:
	@{ command -v promtool && command -v prometheus; } >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1; } \
	    || echo "could not install prometheus; try: apt-get install -y prometheus" >&2; \
	  else echo "tests/deploy need promtool and prometheus:" \
	    "sudo apt-get install -y --no-install-recommends prometheus" >&2; fi; }

# tests/e2e/test_console.py drives Debian's chromium through Playwright (no browser download).
chromium:
	@[ -x /usr/bin/chromium ] || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; } \
	    || echo "could not install chromium; try: apt-get install -y chromium" >&2; \
	  else echo "tests/e2e/test_console.py needs Debian's chromium:" \
	    "sudo apt-get install -y --no-install-recommends chromium" >&2; fi; }

bench: $(VENV)/.installed-dev
	@command -v wrk >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && apt-get install -y -qq wrk; \
	  else echo "bench needs wrk: install it first, e.g. sudo apt-get install -y wrk" >&2; exit 1; fi; }
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info src/*.egg-info
