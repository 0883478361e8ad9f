# The two commands of the README: `make demo` and `make test`. Both create the
# virtual environment and install what they need by themselves: the demo the
# runtime dependencies and the record extra (its recorder writes HDF5); the
# tests add the test and bench extras (`make test-bench`, which CI runs after
# `make test`, runs the benchmarks once in quick mode, with their Redis peer).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=
# `make test` runs the suite on two pytest-xdist workers, a module per worker at a
# time (each module's fixtures made once): most tests wait on processes they
# started, so two at once take 4.5 minutes where one at a time took 8.5 on the
# 2-core reference machine. `make pytest XDIST=` runs them one at a time.
XDIST ?= -n 2 --dist loadscope
PKG_DIRS := broker publisher subscriber bridge cli
# A strict editable install links the package tree under build/, which mypy and
# import-linter can read (the directories map to shmcast.*). A new module needs
# a re-install: hence the package directories as prerequisites.
EDITABLE := --config-settings editable_mode=strict
RUNTIME  := $(VENV)/.runtime-stamp
TESTDEPS := $(VENV)/.test-stamp
DOCKERDEPS := $(VENV)/.docker-stamp

.PHONY: demo test test-bench test-docker test-arm64 lint pytest bench bench-quick soak system-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# The compiled core is built by the install: editing it needs a re-install too.
$(RUNTIME): pyproject.toml $(PKG_DIRS) broker/_core.c | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[record]' $(EDITABLE)
	touch $@

$(TESTDEPS): $(RUNTIME)
	$(BIN)/python -m pip install -q -e '.[test,bench,record,zenoh]' $(EDITABLE)
	touch $@

$(DOCKERDEPS): $(TESTDEPS)
	$(BIN)/python -m pip install -q -e '.[test,bench,docker]' $(EDITABLE)
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

demo: $(RUNTIME)
	$(BIN)/shmcast demo $(DEMO_ARGS)

lint: $(TESTDEPS)
	$(BIN)/ruff check $(PKG_DIRS) bench tests
	$(BIN)/ruff format --check $(PKG_DIRS) bench tests
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

pytest: $(TESTDEPS) system-deps
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

test: lint pytest

# The benchmark suite end to end in quick mode, its JSON checked (no timing is
# asserted): 1.5 minutes, so not part of `make test`; CI runs it after it.
test-bench: $(TESTDEPS) system-deps
	$(BIN)/python -m pytest -m benchsuite tests/test_bench_quick.py $(PYTEST_ARGS)

# The deployment on a real Docker engine (tests/test_docker_engine.py): as root it
# installs Debian's docker.io and docker-compose, starts a private dockerd (no
# bridge, no iptables; data in $$SHMCAST_DOCKER_ROOT, default
# /var/tmp/shmcast-test-docker, kept as a cache), builds the image and runs the
# compose deployment; elsewhere its tests skip and say why. Not part of `make test`.
test-docker: $(DOCKERDEPS)
	$(BIN)/python -m pytest -m docker -v -o faulthandler_timeout=900 tests/test_docker_engine.py $(PYTEST_ARGS)

# The engine's tests on aarch64 under qemu-user, in a Debian arm64 root made by
# mmdebstrap (tests/arm64/test-arm64.sh; caches in $$SHMCAST_ARM64_CACHE, default
# /var/tmp/shmcast-arm64). Needs root; elsewhere it says why and skips. Emulation
# runs under this CPU's memory ordering: it proves the core builds, emits
# acquire/release instructions and passes the tests on aarch64, not that no
# weak-ordering bug is left. Not part of `make test`. PYTEST_ARGS narrow it (-k ...).
test-arm64:
	bash tests/arm64/test-arm64.sh $(PYTEST_ARGS)

# The full suite also measures iceoryx2 (optional extra): installed here, not for tests.
bench: $(TESTDEPS) system-deps
	$(BIN)/python -m pip install -q -e '.[iceoryx]' $(EDITABLE) || echo "warning: iceoryx2 not installed; its rows will be skipped"
	$(BIN)/python -m bench

bench-quick: $(TESTDEPS)
	$(BIN)/python -m bench --quick

soak: $(TESTDEPS) system-deps
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .import_linter_cache broker/*.so
