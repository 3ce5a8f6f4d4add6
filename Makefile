# Every target sets up what it needs: a fresh clone only needs python3 (3.9+).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PROMPT := tom was watching tv in his room . mary came into the room . mary said hi to

.PHONY: help install dev quickstart test test-slow docs clean

help:
	@echo "make quickstart   install into .venv, train on the built-in stories (~2 min), generate"
	@echo "make test         install the dev extras into .venv and run the test suite"
	@echo "make test-slow    the long checks too (full PTB runs; they find PTB through LMTRAIN_PTB_DIR)"
	@echo "make clean        remove .venv and caches (runs/ is kept)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The stamps re-run pip only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	@touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@ $(VENV)/.installed

install: $(VENV)/.installed
dev: $(VENV)/.installed-dev

quickstart: install
	$(BIN)/lmtrain fit configs/quickstart.yaml --overwrite
	$(BIN)/lmtrain generate --prompt "$(PROMPT)" --show-top 3 --greedy --max-tokens 1

test: dev
	$(BIN)/python -m pytest -q

test-slow: dev
	$(BIN)/python -m pytest -q -m slow

# Regenerate the generated tables: config keys (docs/configuration.md) and
# bad inputs (docs/reliability.md, by running every case of tests/bad_inputs.py).
docs: install
	$(BIN)/python -m tests.gendocs

clean:
	rm -rf $(VENV) .pytest_cache data/cache *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
