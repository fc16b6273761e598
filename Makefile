# Set-up and the everyday commands. Everything lives in the virtualenv .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: install data browser run test test-fast lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

data:
	bash scripts/ensure_data.sh

browser:  ## headless Chromium + chromedriver (Debian) for the MLflow UI test
	bash scripts/ensure_browser.sh

run: install data  ## the main job on the built-in default config
	$(PY) -m orchestrator.run $(ARGS)

test: install data browser  ## lint + the whole test suite (what CI runs)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install data
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .

bench: install data  ## benchmark scripts: print measured ratios (not tests)
	$(PY) bench/train_throughput.py
	$(PY) bench/search_overhead.py
	$(PY) bench/search_overhead.py --img-size 224 --patch-size 28 --batch 32 --steps 10
	$(PY) bench/realized_speed.py --threads 1 --rounds 10
	$(PY) bench/trial_overhead.py
	$(PY) bench/syncs.py
	$(PY) bench/faults.py

clean:
	rm -rf runs .pytest_cache
