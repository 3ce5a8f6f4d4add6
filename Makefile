# Every target sets up what it needs: a fresh clone only needs python3 (3.9+).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PROMPT := tom was watching tv in his room . mary came into the room . mary said hi to

.PHONY: help install dev quickstart lint test test-slow recall-seeds docs clean

help:
	@echo "make quickstart   install into .venv, train on the built-in stories (~4 min), generate"
	@echo "make lint         ruff (style and format) and the import contracts of pyproject.toml"
	@echo "make test         install the dev extras into .venv and run the test suite"
	@echo "make test-slow    the long checks too (full PTB runs; they find PTB through LMTRAIN_PTB_DIR)"
	@echo "make recall-seeds the recall table of docs/why-lstm.md: 16 runs of about 6 min, then the probe (~1.7 h)"
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

lint: dev
	$(BIN)/ruff check lmtrain tests benchmarks
	$(BIN)/ruff format --check lmtrain tests benchmarks
	$(BIN)/lint-imports

test: dev
	$(BIN)/python -m pytest -q

test-slow: dev
	$(BIN)/python -m pytest -q -m slow

# docs/why-lstm.md's recall table: ten seeds of the LSTM, three of the GRU and the RNN, the same
# training each (7 epochs), then the probe's min and median over the seeds of each cell and each
# model's errors by name.  None of these seeds was used to choose the recipe.
RECALL_RUNS = $(foreach s,6 7 8 9 10 11 12 13 14 15,lstm:$(s)) $(foreach s,6 7 8,gru:$(s) rnn:$(s))

recall-seeds: install
	for run in $(RECALL_RUNS); do \
	  cell=$${run%:*}; seed=$${run#*:}; dir=runs/recall-$$cell-seed$$seed; \
	  resume=$$(test -f $$dir/checkpoints/last.npz && echo --resume); \
	  $(BIN)/lmtrain fit configs/recall-$$cell.yaml --set seed=$$seed --run-dir $$dir $$resume || exit 1; \
	done
	$(BIN)/lmtrain probe recall $(foreach r,$(RECALL_RUNS),--ckpt runs/recall-$(subst :,-seed,$(r))/checkpoints/best.npz) \
	  --distances 0,5,10,20,40,60,80 --stories 400 --errors --plot recall.png

# Regenerate the generated tables: config keys (docs/configuration.md) and
# bad inputs (docs/reliability.md, by running every case of tests/bad_inputs.py).
docs: install
	$(BIN)/python -m tests.gendocs

clean:
	rm -rf $(VENV) .pytest_cache data/cache *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
