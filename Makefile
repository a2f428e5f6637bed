# The two commands of the README: `make demo` runs the whole pipeline on the
# built-in demo, `make test` runs the tests. Each first creates or updates the
# virtual environment. A torch already installed there (your CUDA build, say)
# is kept; otherwise torch==2.13.0 is installed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fusechat-installed
TORCH ?= torch==2.13.0
# Two workers, one test file each at a time (module fixtures such as the demo run are made
# once), longest files first (tests/conftest.py orders them; xdist keeps that order), and the
# 25 slowest tests listed at the end, so a slower suite shows where its time went. The workers
# share one Prefect server (tests/conftest.py). A third worker measured no gain: 605 s against
# 557 s for two (the two cores were already busy 90 % of the time).
PYTEST_ARGS ?= -n 2 --dist loadfile --no-loadscope-reorder --durations=25

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/fusechat demo

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) fusechat-artifacts .pytest_cache
