# The two commands: `make run` and `make test`. Everything else is a step they take.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# torch is pinned here, not in pyproject: on these machines 2.13.0 is the CPU wheel on local disk,
# while a GPU image installs its own CUDA build (docker/worker.Dockerfile).
TORCH  ?= torch==2.13.0

# Binaries some tests drive (config validation, the browser), as command:apt-package pairs:
# installed with apt-get when missing and we are root, one package per apt-get call, so a package
# this machine's archive lacks (stock Debian has no kubectl) never blocks the others; the tests
# that need a tool still missing skip and say why.
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
	@missing=""; tools=""; for pair in $(SYSTEM_TOOLS); do \
	  command -v $${pair%%:*} >/dev/null || { missing="$$missing $$pair"; tools="$$tools $${pair%%:*}"; }; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
	  echo "WARNING: missing$$tools (not root, or no apt-get): the tests that need them will skip"; \
	  exit 0; fi; \
	apt-get update -qq || echo "WARNING: apt-get update failed; trying the installs anyway"; \
	for pair in $$missing; do tool=$${pair%%:*}; pkg=$${pair#*:}; \
	  echo "installing $$pkg (for $$tool)"; \
	  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$pkg >/dev/null; then \
	    echo "WARNING: could not install $$pkg with apt-get (not in this machine's archive?): the tests that need $$tool will skip"; \
	  elif ! command -v $$tool >/dev/null; then \
	    echo "WARNING: $$pkg installed but $$tool is still missing: the tests that need it will skip"; \
	  fi; \
	done

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
