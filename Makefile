# The two commands: `make run` and `make test`. Both create .venv on first use.
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

unit: $(STAMP)
	$(BIN)/trial -j2 tests

test: lint typecheck unit

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) _trial_temp* .mypy_cache .ruff_cache .hypothesis build *.egg-info

demo: $(STAMP)
	$(BIN)/python demo/run_demo.py
