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
	$(BIN)/python -m pip install --disable-pip-version-check -q -e ".[test,plots,attacks]"
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps torchattacks==3.5.1
	touch $@

setup: $(VENV)/.installed

# two workers (pytest-xdist) on the two cores; one test file per worker at a time (--dist loadfile),
# so module fixtures and files a test module writes are never shared between workers
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

demo: setup
	$(BIN)/bcpc demo

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
