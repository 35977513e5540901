# keybroker entry points. `make test` is what CI runs (.ci/run).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
CARGO ?= cargo
CLUSTER_DIR ?= .cluster
export NO_PROXY := 127.0.0.1,localhost

.PHONY: help test tools lint unit e2e crds bench cluster-up cluster-down

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

bench: tools ## Benchmarks against a real control plane (controller vs. plain-client floor; broker vs. direct STS), as tables
	$(CARGO) build -q --release --locked -p keybroker-operator -p keybroker-e2e --bins
	./target/release/keybroker-bench controller
	./target/release/keybroker-bench broker
	./target/release/keybroker-bench webhook

crds: ## Regenerate crds/ from the Rust types (a unit test fails when they are stale)
	$(CARGO) run -q --locked -p keybroker-operator --bin crdgen -- --out crds

cluster-up: tools ## Start a local control plane and MinIO in $(CLUSTER_DIR) and leave it running
	@$(CARGO) run -q --locked -p keybroker-e2e --bin keybroker-cluster -- up --dir $(CLUSTER_DIR)

cluster-down: ## Stop what cluster-up started and delete $(CLUSTER_DIR)
	@$(CARGO) run -q --locked -p keybroker-e2e --bin keybroker-cluster -- down --dir $(CLUSTER_DIR)
