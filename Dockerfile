# syntax=docker/dockerfile:1
# Two images from one build (each final stage names its image in a `dev.kvgate.image` label,
# which tests/test_kube_images.py checks the chart and the operator against):
# - `runtime` (the default target), ghcr.io/kvgate/kvgate: gateway + operator (`kvgate serve`),
#   and the vLLM simulator the Sim engine runs (`python -m kvgate_sim`).
#     docker build -t ghcr.io/kvgate/kvgate:0.1.0 .
# - `model-loader`, ghcr.io/kvgate/kvgate-model-loader: the same package plus the download tools
#   it runs (`python -m lb_operator.loader`): LoRA adapter-loader sidecars and cache-loading Jobs.
#     docker build --target model-loader -t ghcr.io/kvgate/kvgate-model-loader:0.1.0 .

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: compile the Cython ring core into a wheel and install it with its dependencies ---
FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY lb ./lb
COPY operator ./operator
COPY kvgate ./kvgate
COPY sim ./sim
RUN python -m venv /opt/kvgate \
 && /opt/kvgate/bin/pip install --upgrade pip \
 && /opt/kvgate/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/kvgate/bin/pip install /wheels/kvgate-*.whl \
 && cd / \
 && /opt/kvgate/bin/python -c "import lb.ring as r; assert r.IMPLEMENTATION == 'cython' == r.INDEX_IMPLEMENTATION, (r.IMPLEMENTATION, r.INDEX_IMPLEMENTATION)" \
 && /opt/kvgate/bin/python -m compileall -q /opt/kvgate

# --- loader-build: the loader's download tools in the same virtualenv (hf:// and s3:// URLs;
# gs:// and oss:// need gcloud and ossutil, which are not pip packages: add them in a derived image)
FROM build AS loader-build
RUN /opt/kvgate/bin/pip install 'huggingface_hub[cli]' awscli \
 && /opt/kvgate/bin/python -m compileall -q /opt/kvgate

# --- base: slim Python, no compiler, non-root, nothing written outside /tmp ------------------
FROM ${PYTHON_IMAGE} AS base
RUN groupadd --system --gid 10001 kvgate \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
      --shell /usr/sbin/nologin kvgate
# Bytecode was compiled at build time; HOME and TMPDIR point at /tmp, the one writable mount
# (an emptyDir in the chart), so the root filesystem can be read-only.
ENV PATH=/opt/kvgate/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp
WORKDIR /tmp
USER 10001:10001

# --- model-loader: what the operator runs as `python -m lb_operator.loader serve|fetch|evict`
FROM base AS model-loader
LABEL dev.kvgate.image="ghcr.io/kvgate/kvgate-model-loader"
COPY --from=loader-build /opt/kvgate /opt/kvgate
EXPOSE 8001
ENTRYPOINT ["python", "-m", "lb_operator.loader"]
CMD ["serve"]

# --- runtime (last: the default target): the gateway and operator ----------------------------
FROM base AS runtime
LABEL dev.kvgate.image="ghcr.io/kvgate/kvgate"
COPY --from=build /opt/kvgate /opt/kvgate
EXPOSE 8000 9090
ENTRYPOINT ["kvgate"]
CMD ["serve", "--config", "/etc/kvgate/config.yaml"]
