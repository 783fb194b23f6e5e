# The two commands: `make run` and `make test`. Everything installs into the project.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NU_STAMP := $(VENV)/.nushell
DATA_DIR ?= $(CURDIR)/.data
PYTEST_ARGS ?=

.PHONY: help install browser run test lint format bench chaos test-cluster clean

help:
	@echo "make run    install, start the local stack and run the sample workflow (Ctrl-C stops)"
	@echo "make test   install, then run the test suite against real NATS servers"
	@echo "make lint   ruff format check, ruff, mypy"
	@echo "make chaos  the long fault tests (pytest -m slow); CI runs them after make test"
	@echo "make test-cluster  the deployment checks and every 3-node NATS cluster test"
	@echo "make bench  benchmarks (see docs/performance.md)"

$(BIN)/python:
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Python 3.11 or newer is required (PYTHON=$(PYTHON))" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# Nushell: use `nu` from PATH when there is one, otherwise the pinned npm package,
# linked into the virtual environment so that every service finds it.
$(NU_STAMP): $(BIN)/python tools/package.json
	@if command -v nu >/dev/null 2>&1; then \
		echo "using nu from PATH: $$(command -v nu)"; \
	else \
		npm install --prefix tools --no-package-lock --no-audit --no-fund --loglevel=error && \
		native=$$(ls tools/node_modules/@nushell/*/bin/nu | head -n1) && \
		ln -sf "$(CURDIR)/$$native" $(BIN)/nu && \
		echo "installed $$($(BIN)/nu --version) into $(BIN)/nu"; \
	fi
	touch $@

# The runner starts task programs through this small static program (core/launch.c): the
# task user and the parent-death signal for about a third of setpriv's cost. Without a C
# compiler (installed with apt when we are root) tasks start through setpriv instead.
LAUNCH := $(BIN)/provisioning-launch
$(LAUNCH): core/launch.c $(BIN)/python
	@if ! command -v cc >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing a C compiler for $(LAUNCH)"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends gcc libc6-dev >/dev/null; } || true; \
	fi
	@if command -v cc >/dev/null 2>&1; then \
		cc -O2 -Wall -Wextra -static -o $@ core/launch.c 2>/dev/null || \
			cc -O2 -Wall -Wextra -o $@ core/launch.c; \
	else \
		echo "no C compiler: task programs start through setpriv (slower)" >&2; \
	fi

install: $(STAMP) $(NU_STAMP) $(LAUNCH)

# The console's browser tests drive Debian's chromium through Playwright (Playwright's own
# browser download cannot work here: never `playwright install`). Installed with apt when it
# is missing and we are root (as CI is); elsewhere those tests skip, and fail under CI=true.
browser:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's chromium for the browser tests"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends chromium >/dev/null; } || \
		echo "could not install chromium: the browser tests will skip (and fail under CI=true)" >&2; \
	fi

run: install
	$(BIN)/provisioning-orchestrator up --data-dir $(DATA_DIR) --demo

test: install browser
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

chaos: install
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

test-cluster: install
	$(BIN)/python -m pytest tests/test_deploy.py tests/test_cluster.py $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) tools/node_modules .data .pytest_cache .mypy_cache .ruff_cache
