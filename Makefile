# The README's two commands: `make demo` and `make test`. Everything installs into .venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
CONFIG ?= configs/demo.toml
STORE  ?= store/dpo_neurons.duckdb
PORT   ?= 8501

.PHONY: demo test pipeline app install bench clean

# Reinstalls only when a requirements file changes; each stamp records one install set.
$(VENV)/.pipeline: requirements.txt requirements-pipeline.txt
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
