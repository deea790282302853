# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PORT   ?= 8080
MODEL  ?=
DEVICE ?=
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install serve test test-gpu tiny-model bench bench-engine lint clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python -m gemma_serve.dev_server
	touch $@

# Truss server (port $(PORT)) -> gRPC -> tritonserver -> portable engine. Without MODEL: the tiny Gemma.
serve: install
	$(BIN)/python -m gemma_serve serve --port $(PORT) $(if $(MODEL),--model $(MODEL)) $(if $(DEVICE),--device $(DEVICE))

test: install
	$(BIN)/python -m pytest -q tests

# GPU tests only (skipped without CUDA).
test-gpu: install
	$(BIN)/python -m pytest -q tests/gpu

tiny-model: install
	$(BIN)/python -m gemma_serve make-tiny-model

bench: install
	$(BIN)/python -m gemma_serve bench $(ARGS)

# Offline engine benchmark on a CUDA GPU (random weights, Gemma 3 4B shapes): W1/W2/W3, see docs/benchmarks.md.
bench-engine: install
	$(BIN)/python -m gemma_serve.bench.engine_bench --out bench/results/engine_bench.json $(ARGS)

lint: install
	$(BIN)/python -m ruff check packages model tests

clean:
	rm -rf build .cache .pytest_cache
