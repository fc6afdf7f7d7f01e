# headrace. On a fresh machine: `make demo` runs the main job on embedded defaults; `make test` runs the
# tests. Both create the virtualenv (.venv) from the locked versions; `make test` also builds the Flink
# job-server jar from Maven Central into ~/.cache/headrace/jars once.

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
HEADRACE := $(VENV)/bin/headrace
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install media-deps demo test test-all jars lint format wheel lock bench-deps clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --constraint constraints.txt --editable '.[dev]'
	touch $@

install: $(STAMP)

# espeak-ng speaks the omni path's test and demo speech (a Debian package: installed when missing and
# the user may; the omni tests skip, saying so, where it is absent).
media-deps:
	@command -v espeak-ng >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null; \
	  else echo "make: espeak-ng is missing (apt-get install espeak-ng); the omni speech tests will skip"; fi; }

jars: $(STAMP)
	$(HEADRACE) jars fetch

demo: $(STAMP) media-deps
	$(HEADRACE) demo

# Everything but tests marked slow; the real Flink tests are included.
test: $(STAMP) jars media-deps
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP) jars media-deps
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The wheel Dataflow workers install (staged with --extra_package by the DataflowRunner path).
wheel: $(STAMP)
	$(PY) -m pip wheel --no-deps --wheel-dir dist .

# Baselines the benchmarks compare against (crowd-kit), installed under the same constraints.
bench-deps: $(STAMP)
	$(PY) -m pip install --quiet --constraint constraints.txt -r bench/requirements.txt

# Re-lock after changing dependencies in pyproject.toml.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet '.[dev]'
	.lock-venv/bin/pip freeze --exclude-editable | grep -v '^headrace' > constraints.txt
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
