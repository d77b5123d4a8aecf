# One command each: `make run` starts the gateway on the embedded default; `make test` runs the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv build run test bench-ring clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

venv: $(BIN)/python
	$(BIN)/pip install -q -e '.[test,bench]'

build: venv
	$(BIN)/python setup.py -q build_ext --inplace

run: build
	$(BIN)/kvgate up -f examples/local.yaml

test: build
	$(BIN)/python -m pytest -q

bench-ring: build
	$(BIN)/python bench/ring_bench.py

clean:
	rm -rf $(VENV) build *.egg-info lb/_chwbl.c lb/*.so
