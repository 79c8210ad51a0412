# The two commands: `make run` and `make test`. Both create .venv on first use.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Editable in "compat" mode: PEP 660 editable installs hide twisted/plugins/ from twistd.
PIP_INSTALL := $(BIN)/pip install --disable-pip-version-check --quiet

.PHONY: run test lint typecheck unit bench demo clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --config-settings editable_mode=compat -e '.[test]'
	touch $@

run: $(STAMP)
	$(BIN)/twistd -n --pidfile= sparkytrack $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

# trial's last line (PASSED (successes=N) / FAILED (...)) is also said as "N passed, M failed".
unit: $(STAMP)
	@set -o pipefail; $(BIN)/trial -j2 tests 2>&1 | tee _trial_output.log; status=$$?; \
	tail -1 _trial_output.log | $(BIN)/python tests/support/trial_summary.py; \
	rm -f _trial_output.log; exit $$status

test: lint typecheck unit

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) _trial_temp* .mypy_cache .ruff_cache .hypothesis build *.egg-info

demo: $(STAMP)
	$(BIN)/python demo/run_demo.py
