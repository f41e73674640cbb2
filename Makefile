# akidb-embed: the two commands a fresh machine needs are `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

# Which MLX backend to install: Metal on macOS, CUDA where an NVIDIA driver is
# present, else the CPU wheel. Override with `make MLX_BACKEND=cpu ...`.
UNAME_S := $(shell uname -s)
ifeq ($(UNAME_S),Darwin)
MLX_BACKEND ?= metal
else ifneq ($(shell command -v nvidia-smi 2>/dev/null),)
MLX_BACKEND ?= cuda
else
MLX_BACKEND ?= cpu
endif
# What `make run` installs (the server, its client, MLX for this machine) and what
# `make test` adds (linters, type checker, pytest, stub generator).
ifeq ($(MLX_BACKEND),metal)
RUN_REQ := .
else
RUN_REQ := .[$(MLX_BACKEND)]
endif
ifeq ($(MLX_BACKEND),metal)
DEV_REQ := .[dev]
else
DEV_REQ := .[$(MLX_BACKEND),dev]
endif
# The client is its own distribution (clients/python); the server depends on it. Quiet:
# setuptools' banner for editable installs (about folders shadowing packages, which this
# layout does not have) is silenced.
INSTALL := PYTHONWARNINGS="ignore:Editable installation" $(PIP) install --quiet --no-input \
  -e ./clients/python -e

# MLX's CPU backend resolves `libblas` at process start: run tests and benchmarks with
# Debian's OpenBLAS (installed by `make setup`) preloaded, and its kernels chosen for this
# CPU (server/akidb_embed/host/blas.py; `akidb-embed serve` does the same by itself). Elsewhere
# it runs the command unchanged.
WITH_BLAS = $(PY) -m akidb_embed.host.blas

RUN_STAMP := $(VENV)/.run-stamp
SETUP_STAMP := $(VENV)/.setup-stamp
REFERENCE_STAMP := $(VENV)/.reference-stamp
PROTO_SRC := proto/akidb/embedding/v1/embedding_service.proto
PROTO_OUT := clients/python
PACKAGING := pyproject.toml clients/python/pyproject.toml build_support/akidb_build.py

.PHONY: setup setup-run system-deps native setup-reference proto proto-check lint typecheck run \
  test test-fast bench bench-replicas clean image image-check

setup: $(SETUP_STAMP)
setup-run: $(RUN_STAMP)

# An optimised BLAS for MLX's CPU backend (the wheel bundles a slow reference one).
system-deps:
	@bash scripts/install-system-deps.sh

# What serving needs, nothing more. The server's wheel brings the embedded default model
# (build_support/akidb_build.py), so it serves with no network afterwards.
$(RUN_STAMP): $(PACKAGING)
	@$(MAKE) --no-print-directory system-deps
	@test -x $(PY) || { echo "==> creating $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@$(PIP) install --quiet --no-input --upgrade pip
	@echo "==> installing akidb-embed, its client, MLX ($(MLX_BACKEND)) and the default model into $(VENV)"
	@echo "    (first time: a few minutes and a few hundred MB of downloads)"
	@$(INSTALL) "$(RUN_REQ)"
	@$(MAKE) --no-print-directory native
	@touch $@

# Everything `make test` needs on top: linters, mypy, pytest, the stub generator.
$(SETUP_STAMP): $(RUN_STAMP)
	@echo "==> installing the development tools into $(VENV)"
	@$(INSTALL) "$(DEV_REQ)"
	@touch $@

# The bf16 linear layer for CPUs with AVX512-BF16 or AMX (ext/bf16, docs/precision-cpu.md),
# built against the mlx wheel's CMake config. Never fails: without a compiler, CMake or
# oneDNN it says why, and the CPU engine stays fp32.
native:
	@$(PIP) install --quiet --no-input "nanobind==3.1.0"
	@PY=$(PY) bash scripts/build-native.sh

# torch (CPU build), sentence-transformers and transformers: the reference the
# parity tests and the benchmark compare against.
setup-reference: $(REFERENCE_STAMP)
$(REFERENCE_STAMP): $(SETUP_STAMP)
	@echo "==> installing the reference implementation (torch CPU, sentence-transformers; ~1 GB)"
	@$(INSTALL) ".[reference]"
	@touch $@

proto: $(SETUP_STAMP)
	$(PY) -m grpc_tools.protoc -I proto \
	  --plugin=protoc-gen-mypy=$(VENV)/bin/protoc-gen-mypy \
	  --plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc \
	  --python_out=$(PROTO_OUT) --grpc_python_out=$(PROTO_OUT) \
	  --mypy_out=$(PROTO_OUT) --mypy_grpc_out=$(PROTO_OUT) $(PROTO_SRC)
	@for d in akidb akidb/embedding akidb/embedding/v1; do touch $(PROTO_OUT)/$$d/__init__.py; done

# Generated stubs are committed; this fails if they are stale.
proto-check: proto
	@git diff --exit-code -- $(PROTO_OUT)/akidb || \
	  (echo "generated stubs are out of date: run 'make proto' and commit" >&2; exit 1)

lint: $(SETUP_STAMP)
	$(VENV)/bin/ruff check server clients/python tests build_support $(wildcard bench)
	$(VENV)/bin/ruff format --check server clients/python tests build_support $(wildcard bench)

typecheck: $(SETUP_STAMP)
	$(VENV)/bin/mypy

# Set everything up, then serve the embedded default model on the default socket.
run: $(RUN_STAMP)
	@$(VENV)/bin/akidb-embed serve $(ARGS)

# Set everything up, then run the whole test suite: Python, then the Rust and Node clients.
test: $(REFERENCE_STAMP) proto-check lint typecheck
	$(WITH_BLAS) $(PY) -m pytest -q $(PYTEST_ARGS)
	@$(MAKE) --no-print-directory test-clients

test-fast: $(SETUP_STAMP)
	$(WITH_BLAS) $(PY) -m pytest -q -m "not slow and not reference" $(PYTEST_ARGS)

bench: $(REFERENCE_STAMP)
	$(WITH_BLAS) $(PY) -m bench $(BENCH_ARGS)

# 1 replica vs a pool of REPLICAS on loopback (docs/replicas.md); needs no reference models.
REPLICAS ?= 3
bench-replicas: $(SETUP_STAMP)
	$(WITH_BLAS) $(PY) -m bench --replicas $(REPLICAS) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info server/akidb_embed/modeling/_bf16*.so

# --- Container image -----------------------------------------------------------
# The Dockerfile's steps live in scripts/image-install.sh; image-check runs the same steps in
# a clean Debian root (no container runtime or base image needed) and reports the size.
IMAGE ?= akidb-embed:0.1.0
CONTAINER ?= $(shell command -v docker 2>/dev/null || command -v podman 2>/dev/null)

image:
	@test -n "$(CONTAINER)" || { echo "make image needs docker or podman (or: make image-check)" >&2; exit 1; }
	$(CONTAINER) build -t $(IMAGE) .

# Slow (two Debian roots, a full install): not part of `make test`.
image-check:
	@bash scripts/image-check.sh

# --- Clients -----------------------------------------------------------------
# The Rust client (clients/rust) and the Node contract test (clients/node) start
# the real server from this checkout with the venv's Python and test against it.
CLIENT_PYTHON ?= $(abspath $(PY))

.PHONY: test-rust test-node test-clients

# Debian's packaged crates + protoc (no crates.io needed), then unit and server tests, the
# slow replica-pool ones (#[ignore]d in a plain `cargo test`) included; `make test-rust
# CARGO_TEST_ARGS=` leaves them out.
CARGO_TEST_ARGS ?= -- --include-ignored
test-rust: $(SETUP_STAMP)
	@bash scripts/install-rust-deps.sh
	cd clients/rust && AKIDB_EMBED_PYTHON=$(CLIENT_PYTHON) cargo test --offline $(CARGO_TEST_ARGS)

# @grpc/grpc-js loading proto/ directly: every RPC and grpc.health.v1 over the socket.
test-node: $(SETUP_STAMP)
	@bash scripts/install-node-deps.sh
	cd clients/node && npm ci --no-audit --no-fund --loglevel=error && AKIDB_EMBED_PYTHON=$(CLIENT_PYTHON) node --test

test-clients: test-rust test-node
