# Set-up and entry points. `make demo` and `make test` work from a fresh clone:
# they create .venv, install the CPU build of torch first, then bcpc with its test extras.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

.PHONY: setup test demo clean

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q $(TORCH)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e ".[test,plots]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/bcpc demo

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
