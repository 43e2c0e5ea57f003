# jetinfer: two commands for a newcomer (`make demo`, `make test`); both install what they need.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST := $(BIN)/python -m pytest

.PHONY: install demo test test-slow lint bench clean

install: $(STAMP)

# torch is pinned to the CPU build this workplace keeps on disk; it is only used to export demo models.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[export,demo,video,bench,gpu,dev]"
	# tensorrt-stubs declares the full TensorRT as a dependency, which cannot be installed here: stubs only.
	$(BIN)/python -m pip install --quiet --no-deps "tensorrt-stubs>=10.13"
	$(BIN)/python .ci/patch_tensorrt_stubs.py
	touch $(STAMP)

demo: install
	$(BIN)/jetinfer demo

test: install
	$(PYTEST) -m "not slow"

test-slow: install
	$(PYTEST) -m slow

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: install
	$(BIN)/jetinfer bench --embedded --engine-only

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
