# Every target creates .venv on first use and installs the pinned dependency set.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench bench-quick clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m services.train --config ring8_pacgan

test: $(STAMP)
	$(PY) -m pytest -q --durations=15

# The inner loop: every test that starts no Ray, S3 endpoint or MLflow server.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not integration" --durations=5

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The published mode-coverage tables reproduced, plus Fashion-MNIST; writes docs/RESULTS.md
# (the recorded runs: ~49 min of 2 cores on the host that trained them; see README).
bench: $(STAMP)
	$(PY) -m bench

# The same pipeline on short budgets and one seed (< 10 min); writes docs/RESULTS_quick.md.
bench-quick: $(STAMP)
	$(PY) -m bench --quick

clean:
	rm -rf $(VENV) runs .pytest_cache
