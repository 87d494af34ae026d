# The two commands: `make run` and `make test`. Everything else is a step they take.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# torch is pinned here, not in pyproject: on these machines 2.13.0 is the CPU wheel on local disk,
# while a GPU image installs its own CUDA build (docker/worker.Dockerfile).
TORCH  ?= torch==2.13.0

# Binaries some tests drive (config validation, the browser): installed with apt-get when
# missing and we are root; otherwise those tests skip and say why.
SYSTEM_TOOLS := docker-compose:docker-compose kubectl:kubectl chromium:chromium

.PHONY: install system-tools run test lint typecheck pytest bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[api,worker,embedded,dev]'
	touch $@

system-tools:
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
	  command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
	      || echo "WARNING: could not install$$missing; the tests that need them will skip"; \
	  else echo "WARNING: missing$$missing (not root): the tests that need them will skip"; fi; \
	fi

run: install
	$(VENV)/bin/selfcascade-serve

lint: install
	$(VENV)/bin/ruff check .

typecheck: install
	$(VENV)/bin/mypy

pytest: install system-tools
	$(VENV)/bin/pytest -q

test: lint typecheck pytest

bench: install
	$(PY) bench/engine_overhead.py

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
