# The README's two commands: `make demo` and `make test`. Everything installs into .venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
CONFIG ?= configs/demo.toml
STORE  ?= store/dpo_neurons.duckdb
PORT   ?= 8501

.PHONY: demo test pipeline app install bench clean
# demo serves the app on the store that its pipeline writes: under make -j the two would start together.
.NOTPARALLEL:

# Reinstalls only when a requirements file changes; each stamp records one install set.
# Python 3.11 only: the pinned torch's CPU wheel is built for it, and on another Python pip would pull a CUDA build.
$(VENV)/.pipeline: requirements.txt requirements-pipeline.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || \
	  { echo "error: $(PYTHON) is not Python 3.11; install python3.11 or run make PYTHON=/path/to/python3.11" >&2; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-pipeline.txt
	touch $@

$(VENV)/.dev: $(VENV)/.pipeline requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

install: $(VENV)/.pipeline

demo: pipeline app

pipeline: $(VENV)/.pipeline
	$(PY) -m pipeline run --config $(CONFIG)

app: $(VENV)/.pipeline
	STORE=$(STORE) $(VENV)/bin/streamlit run app/Home.py --server.port $(PORT) --server.headless true

# The browser test drives Debian's chromium through Playwright; no browser is downloaded.
/usr/bin/chromium:
	$(if $(filter 0,$(shell id -u)),,sudo) sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium'

test: $(VENV)/.dev /usr/bin/chromium
	$(PY) -m pytest -q tests

# Each benchmark is one command of its own too: python -m bench.<name> --help.
bench: $(VENV)/.pipeline
	$(PY) -m bench.app_queries
	$(PY) -m bench.record_cost
	$(PY) -m bench.record_memory
	$(PY) -m bench.dpo_cost
	$(PY) -m bench.dpo_memory
	$(PY) -m bench.pipeline_cost

clean:
	rm -rf .cache .pytest_cache
