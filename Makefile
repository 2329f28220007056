# ipab: `make demo` runs the demo, `make test` runs the tests; both install what they need first.

SHELL := /bin/bash
VENV := .venv
STAMP := $(VENV)/.ipab-installed
# torch goes in first and on its own, so that pip does not pick another build while resolving the rest.
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PYTHON ?= $(shell command -v python3.11 2>/dev/null || \
	(python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null && command -v python3))

.PHONY: all venv $(VENV) demo test lint format bench docker-test clean

all: test

venv $(VENV): $(STAMP)

$(STAMP): pyproject.toml
	@if [ -z "$(PYTHON)" ]; then echo "ipab needs Python 3.11: install python3.11 (or run make PYTHON=/path/to/python3.11)" >&2; exit 1; fi
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install $(TORCH_PIP_ARGS) '$(TORCH_SPEC)'
	$(VENV)/bin/pip install -e '.[worker,dev]'
	touch $@

demo: $(STAMP)
	$(VENV)/bin/python -m devkit demo

# Tests mostly wait on Redis, S3, SQL and worker processes: a few more processes than cores keep both busy.
# Each file's tests stay in one process (--dist loadfile), so module fixtures are built once.
TEST_PROCESSES ?= 4
test: $(STAMP)
	$(VENV)/bin/pytest -q -n $(TEST_PROCESSES) --dist loadfile --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(VENV)/bin/hadolint docker/*Dockerfile*

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(VENV)/bin/python -m bench.run

# Both images built and the whole system run in containers (root, Debian's docker.io; docker/test/run.sh).
docker-test: $(STAMP)
	docker/test/run.sh

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .ipab demo-out
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
