# radixfleet image: one image for the router and the workers (the command picks the role).
#
#   docker build --target cuda -t radixfleet-cuda .   # GPU hosts: torch 2.11 + triton 3.6 + a C compiler (the default)
#   docker build --target cpu -t radixfleet-cpu .     # CPU-only hosts: CPU torch 2.13, no CUDA libraries
#
# Versions are pinned by deploy/docker/constraints-{cpu,cuda}.txt (the tested sets). Offline builds
# (deploy/compose_e2e.sh) put wheels in deploy/docker/wheelhouse/ and pass
# --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/app/deploy/docker/wheelhouse.
# BASE may be any Debian-like image with python3 >= 3.10 (the e2e script builds one with debootstrap).
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS base
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/cache \
    RADIXFLEET_HOME=/cache/radixfleet \
    HF_HOME=/models/hf \
    TRITON_CACHE_DIR=/cache/triton
# python3-venv: only where the base lacks the venv module (Debian's own python3).
RUN if ! python3 -c "import ensurepip, venv" 2>/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3-venv && rm -rf /var/lib/apt/lists/*; \
    fi \
 && python3 -m venv "$VIRTUAL_ENV" \
 && groupadd --gid 10001 radixfleet \
 && useradd --uid 10001 --gid 10001 --home-dir /cache --no-create-home --shell /usr/sbin/nologin radixfleet \
 && mkdir -p /cache /models /app \
 && chown radixfleet:radixfleet /cache /models
WORKDIR /app
COPY deploy/docker/ deploy/docker/
# Image settings every target inherits (each sets USER itself, after its installs).
EXPOSE 8000
# Model loading takes minutes on a GPU: failures count only after the start period.
HEALTHCHECK --interval=10s --timeout=5s --start-period=900s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["radixfleet"]

# The project's files, copied into each target after its dependencies (so code changes reuse those layers).
FROM scratch AS src
COPY pyproject.toml README.md /app/
COPY router /app/router
COPY worker /app/worker
COPY kernels /app/kernels
COPY bench /app/bench

# ---------------------------------------------------------------- CPU: torch from the CPU wheel index
# (first, so that Docker's legacy builder, which builds every stage up to the target, never needs CUDA wheels)
FROM base AS cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# pip reads these from the environment (each stage declares them): unset means the normal index.
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS
RUN pip install -c deploy/docker/constraints-cpu.txt --extra-index-url "$TORCH_INDEX_URL" \
        torch -r deploy/docker/requirements.txt \
    && pip install --no-deps -c deploy/docker/constraints-cpu.txt xgrammar
COPY --from=src /app /app
RUN pip install --no-deps --no-build-isolation . && python -c "import router, worker, kernels"
USER radixfleet

# ---------------------------------------------------------------- CUDA: torch 2.11 + triton 3.6
FROM base AS cuda
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS
# Triton compiles a small C launcher at the first kernel launch: it needs a C compiler and the
# Python headers (python:*-slim ships the headers; Debian's python3 needs python3-dev).
RUN missing=""; command -v cc >/dev/null || missing="gcc libc6-dev"; \
    python3 -c "import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" \
        || missing="$missing python3-dev"; \
    if [ -n "$missing" ]; then \
        apt-get update && apt-get install -y --no-install-recommends $missing && rm -rf /var/lib/apt/lists/*; \
    fi
RUN pip install -c deploy/docker/constraints-cuda.txt torch triton -r deploy/docker/requirements.txt \
    && pip install --no-deps -c deploy/docker/constraints-cuda.txt xgrammar
COPY --from=src /app /app
RUN pip install --no-deps --no-build-isolation . && python -c "import router, worker, kernels, triton"
USER radixfleet
