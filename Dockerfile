# syntax=docker/dockerfile:1
# The image installs with the same `make install` the tests use, so what CI covers is what ships.
FROM python:3.11-slim

ARG TORCH="torch==2.13.0"
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    XDG_CACHE_HOME=/var/cache/gateway

RUN apt-get update \
    && apt-get install -y --no-install-recommends make=4.* \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --create-home --uid 10001 gateway \
    && mkdir -p /var/cache/gateway && chown gateway /var/cache/gateway

WORKDIR /app
COPY pyproject.toml constraints.txt Makefile README.md ./
COPY gateway ./gateway
RUN make install VENV=/opt/venv EXTRAS= TORCH="${TORCH}"

USER 10001
# Convert the default GGUF once at build time so containers are ready in seconds, not after a 20 s conversion.
RUN /opt/venv/bin/python -c "import asyncio; from gateway.config import load_settings; from gateway.backends.registry import Registry; r = Registry(load_settings()); asyncio.run(r.ensure_loaded(r.lookup('smollm2-135m-instruct')))"

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s \
    CMD ["/opt/venv/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]
ENTRYPOINT ["/opt/venv/bin/gateway", "serve", "--host", "0.0.0.0", "--port", "8000"]
