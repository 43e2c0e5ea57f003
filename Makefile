# jetinfer: two commands for a newcomer (`make demo`, `make test`); both install what they need.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST := $(BIN)/python -m pytest
# The Node.js client of docs/protocol.md, which tests/test_node_client.py runs (skipped without it).
NODE_DEPS := .node-deps
NODE_STAMP := $(NODE_DEPS)/.installed-stamp

.PHONY: install node-deps demo test test-slow lint bench clean

install: $(STAMP) node-deps

node-deps: $(NODE_STAMP)

# Never fails the install: without npm (or its registry) the Node.js client test says why it skips.
$(NODE_STAMP): Makefile
	@if command -v npm >/dev/null 2>&1 && npm install --prefix $(NODE_DEPS) --no-audit --no-fund --no-save \
	    --silent nats@2.29.3 @msgpack/msgpack@3.1.3; then touch $@; \
	else echo "node-deps: npm missing or failed; tests/test_node_client.py will be skipped"; fi

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
	rm -rf $(VENV) $(NODE_DEPS) .mypy_cache .pytest_cache .ruff_cache
