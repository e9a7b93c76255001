# oauthmig — two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

## demo: create the embedded SQLite demo databases and run the whole rollout on them
demo: $(STAMP)
	$(BIN)/oauthmig demo

## test: the full suite on SQLite and PostgreSQL, four pytest-xdist workers (they mostly wait). First sets up what
## the tests need on this machine (scripts/test-components: starts PostgreSQL when it is down,
## installs Debian's chromium, pgbouncer and npm, and axe-core from npm, when missing, one line
## each time)
test: $(STAMP)
	scripts/test-components
	$(BIN)/ruff check oauthmig tests revisions
	$(BIN)/ruff format --check oauthmig tests revisions
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 4 --dist loadgroup

## bench: benchmarks (not timed tests); results go to docs/benchmarks.md by hand
bench: $(STAMP)
	$(BIN)/python -m tests.bench

clean:
	rm -rf $(VENV) .oauthmig .mypy_cache .ruff_cache .pytest_cache *.egg-info
