# Two commands on a fresh machine with Python 3 and make: `make demo`, `make test`.
# Each builds the .venv it needs (idempotent: a stamp file records a finished install).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.autoshard-installed
TEST_WORKERS ?= 2

.PHONY: demo test bench clean

$(STAMP): pyproject.toml Makefile constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and exact: a CPU wheel is available locally; an unpinned torch pulls CUDA packages.
	$(PY) -m pip install --quiet torch==2.13.0
	# every later install is held to constraints.txt, so transformers cannot swap torch for a CUDA build
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m autoshard.demo

test: $(STAMP)
	# two workers: most tests are one single-threaded process; the slow ones start first (tests/conftest.py)
	$(PY) -m pytest -q -n $(TEST_WORKERS)

bench: $(STAMP)
	$(PY) benchmarks/capture_time.py
	$(PY) benchmarks/planning_time.py
	$(PY) benchmarks/plan_gpt3_175b.py
	$(PY) benchmarks/recompute_memory.py
	$(PY) benchmarks/megatron_table1.py
	$(PY) benchmarks/runtime_vs_torch.py
	$(PY) benchmarks/time_limit.py
	$(PY) benchmarks/planning_scaling.py

clean:
	rm -rf $(VENV) build *.egg-info
