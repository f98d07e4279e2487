# tierckpt developer entry points. Each target creates or reuses .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LINT_PATHS := $(wildcard src tests benchmarks examples)
# The CPU wheel of torch; set TORCH_INDEX=https://download.pytorch.org/whl/cpu where
# no local wheel or mirror provides it.
TORCH_SPEC ?= torch==2.13.0+cpu
TORCH_INDEX ?=
STAMP := $(VENV)/.installed-$(shell cat requirements-dev.txt pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: venv test lint typecheck pytest demo demo-recovery bench bench-recovery clean-shm

venv: $(STAMP)

$(STAMP): requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-*
	touch $@

lint: venv
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

typecheck: venv
	$(VENV)/bin/mypy

pytest: venv
	$(PY) -m pytest -q

test: lint typecheck pytest

demo: venv
	$(PY) examples/demo.py

demo-recovery: venv
	$(PY) examples/recovery_demo.py

bench-recovery: venv
	$(PY) -m benchmarks.recovery $(BENCH_ARGS)

bench: venv
	$(PY) -m benchmarks.run $(BENCH_ARGS)

clean-shm:
	rm -rf /dev/shm/tierckpt-test-* /dev/shm/tierckpt-bench-* /dev/shm/tierckpt-demo-*
