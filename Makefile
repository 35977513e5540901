# keybroker entry points. `make test` is what CI runs (.ci/run).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
CARGO ?= cargo
CLUSTER_DIR ?= .cluster
# Where cargo puts binaries (honours CARGO_TARGET_DIR, e.g. a shared one across worktrees).
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)
MUSL_TARGET := x86_64-unknown-linux-musl
export NO_PROXY := 127.0.0.1,localhost

.PHONY: help test tools lint unit e2e crds bench sidecar-static cluster-up cluster-down

help: ## Show the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

test: tools lint unit e2e ## Everything: formatting, clippy, unit tests, e2e tests against real components

tools: ## Build (first time only) etcd, kube-apiserver, kube-controller-manager, MinIO, helm into ~/.cache/keybroker
	@bash e2e/tools/build.sh

lint: ## cargo fmt --check and clippy with warnings denied
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

unit: ## Unit tests (no servers)
	$(CARGO) test --workspace --locked --lib --bins

e2e: tools ## End-to-end tests: each test binary starts its own control plane and MinIO
	$(CARGO) test --workspace --locked --test '*'

bench: tools sidecar-static ## Benchmarks against a real control plane (controller vs. plain-client floor; broker vs. direct STS; webhook vs. a fixed-response floor; sidecar RSS/CPU/start-up/size), as tables
	$(CARGO) build -q --release --locked -p keybroker-operator -p keybroker-e2e --bins
	$(TARGET_DIR)/release/keybroker-bench controller
	$(TARGET_DIR)/release/keybroker-bench broker
	$(TARGET_DIR)/release/keybroker-bench webhook
	$(TARGET_DIR)/release/keybroker-bench sidecar --sidecar $(TARGET_DIR)/$(MUSL_TARGET)/release/keybroker-sidecar $(if $(IDLE_SECONDS),--idle-seconds $(IDLE_SECONDS))

# The sidecar as it ships: one static binary (musl libc, aws-lc compiled in), no runtime deps.
# Needs the Rust target (added here through rustup) and a musl C compiler for aws-lc:
# `apt-get install musl-tools` (Debian/Ubuntu) provides musl-gcc.
sidecar-static: ## Static musl release build of keybroker-sidecar -> $(TARGET_DIR)/x86_64-unknown-linux-musl/release/
	@command -v musl-gcc >/dev/null || { echo "musl-gcc not found: apt-get install musl-tools"; exit 1; }
	@if command -v rustup >/dev/null; then rustup target add $(MUSL_TARGET) >/dev/null; fi
	$(CARGO) build -q --release --locked -p keybroker-sidecar --target $(MUSL_TARGET)
	@ls -l $(TARGET_DIR)/$(MUSL_TARGET)/release/keybroker-sidecar

crds: ## Regenerate crds/ from the Rust types (a unit test fails when they are stale)
	$(CARGO) run -q --locked -p keybroker-operator --bin crdgen -- --out crds

cluster-up: tools ## Start a local control plane and MinIO in $(CLUSTER_DIR) and leave it running
	@$(CARGO) run -q --locked -p keybroker-e2e --bin keybroker-cluster -- up --dir $(CLUSTER_DIR)

cluster-down: ## Stop what cluster-up started and delete $(CLUSTER_DIR)
	@$(CARGO) run -q --locked -p keybroker-e2e --bin keybroker-cluster -- down --dir $(CLUSTER_DIR)
