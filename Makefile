# The two commands of the README: `make demo` and `make test`. Both create the
# virtual environment and install what they need by themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: demo test lint pytest bench bench-quick soak system-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	touch $@

# Debian packages some tests and benchmarks use as real peers (Prometheus,
# promtool, redis-server). Best effort: without root or apt the tests that
# need them skip and say what is missing.
system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; \
	  command -v prometheus >/dev/null || missing="$$missing prometheus"; \
	  command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	  if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing) >/dev/null 2>&1 \
	      || echo "warning: could not install$$missing; the tests that need them will skip"; \
	  fi; \
	fi

demo: $(STAMP)
	$(BIN)/shmcast demo $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check broker publisher subscriber bench tests
	$(BIN)/ruff format --check broker publisher subscriber bench tests
	$(BIN)/mypy

pytest: $(STAMP) system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test: lint pytest

# The full suite also measures iceoryx2 (optional extra): installed here, not for tests.
bench: $(STAMP) system-deps
	$(BIN)/python -m pip install -q -e '.[iceoryx]' || echo "warning: iceoryx2 not installed; its rows will be skipped"
	$(BIN)/python -m bench

bench-quick: $(STAMP)
	$(BIN)/python -m bench --quick

soak: $(STAMP) system-deps
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
