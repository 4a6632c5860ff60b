# The one front door: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# What is installed: jpost and its dependencies (the demo needs no more), and
# the test extras (PyTorch, transformers, peft, ...: the references).
STAMP_RUN := $(VENV)/.installed
STAMP_TEST := $(VENV)/.installed-test
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: setup demo test clean

setup: $(STAMP_TEST)

# Each reinstalls only when pyproject.toml changes; `make setup` is idempotent.
$(STAMP_RUN): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e .
	touch $(STAMP_RUN)

$(STAMP_TEST): $(STAMP_RUN)
	$(PIP) -e '.[test]'
	touch $(STAMP_TEST)

# The main job: GRPO on SmolLM2-135M-Instruct (5-6 min on a 2-core Xeon with AMX);
# held-out accuracy before/after is printed, the model is exported to runs/demo/hf.
demo: $(STAMP_RUN)
	rm -rf runs/demo
	$(PY) -m jpost.main --config=configs/grpo.py --workdir=runs/demo

# Two test workers keep both cores of a small machine busy, each worker on a
# core of its own (tests/conftest.py); `make test TEST_WORKERS=8` on a bigger one.
TEST_WORKERS ?= 2

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

clean:
	rm -rf $(VENV) runs .pytest_cache
