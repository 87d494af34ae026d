# The two commands: `make run` and `make test`. Everything else is a step they take.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# torch is pinned here, not in pyproject: on these machines 2.13.0 is the CPU wheel on local disk,
# while a GPU image installs its own CUDA build (docker/worker.Dockerfile).
TORCH  ?= torch==2.13.0

.PHONY: install run test lint typecheck pytest bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[api,worker,embedded,dev]'
	touch $@

run: install
	$(VENV)/bin/selfcascade-serve

lint: install
	$(VENV)/bin/ruff check .

typecheck: install
	$(VENV)/bin/mypy

pytest: install
	$(VENV)/bin/pytest -q

test: lint typecheck pytest

bench: install
	$(PY) bench/engine_overhead.py

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
