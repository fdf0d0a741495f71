# Two commands on a fresh machine:
#   make demo   -- runs the main job on the embedded default
#   make test   -- runs the test suite
# Each creates (or reuses) the virtual environment in .venv and installs what it needs.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
WORKDIR ?= workdir/demo

.PHONY: demo test install install-test clean

$(VENV)/.core: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.core setup.py
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(VENV)/.core
install-test: $(VENV)/.test

demo: $(VENV)/.core
	$(VENV)/bin/unclip-jax demo --workdir $(WORKDIR)

test: $(VENV)/.test
	$(PY) -m pytest -q -n 2 tests

clean:
	rm -rf $(VENV) workdir
