# Two commands do everything on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pytest-xdist workers: one per core (each single-threaded: tests/conftest.py), longest modules first
# (tests/durations.json), so neither ends alone on a long module
TEST_WORKERS ?= $(shell nproc 2>/dev/null || echo 2)
# a module whose tests share a module-scoped fixture runs on one worker (tests/conftest.py marks it),
# the other tests one by one, in the order collected (longest modules first)
XDIST := --dist loadgroup --no-loadscope-reorder

.PHONY: install demo test test-fast bench clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch first, pinned when absent (CPU build here; GPU users keep their own build)
$(STAMP): $(PY) pyproject.toml setup.py
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) launch/run.py

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) $(XDIST) tests

# the unit tier: no pipeline runs, no model training, no multi-process tests (markers: tests/conftest.py)
test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) $(XDIST) -m "not e2e and not slow and not distributed" tests

bench: $(STAMP)
	$(PY) bench/bench_vendi.py
	$(PY) bench/bench_spokes.py
	$(PY) bench/bench_semdedup.py
	$(PY) bench/bench_features.py
	$(PY) bench/bench_rounding.py
	$(PY) bench/bench_datamask.py
	$(PY) bench/bench_online.py
