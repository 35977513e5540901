# keybroker entry points. `make test` is what CI runs (.ci/run).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
CARGO ?= cargo
CLUSTER_DIR ?= .cluster
# Where cargo puts binaries (honours CARGO_TARGET_DIR, e.g. a shared one across worktrees).
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)
MUSL_TARGET := x86_64-unknown-linux-musl
# The static release builds (what the images ship) have their own target directory outside the
# repo: `make test` builds the images from them, and a clean checkout then rebuilds only the
# workspace's own crates, not the 400 dependencies (a cold musl release build is >10 min here).
STATIC_TARGET_DIR ?= $(HOME)/.cache/keybroker/cargo-static
STATIC_BIN := $(STATIC_TARGET_DIR)/$(MUSL_TARGET)/release
export NO_PROXY := 127.0.0.1,localhost

.PHONY: help test tools lint unit fuzz fuzz-smoke e2e crds bench sidecar-static release-static chart-lint demo cluster-up cluster-down

help: ## Show the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

test: tools lint chart-lint unit fuzz-smoke e2e ## Everything: formatting, clippy, helm lint, unit tests, a short pass of every fuzz target, e2e tests against real components

tools: ## Build (first time only) etcd, kube-apiserver, kube-controller-manager, MinIO, helm and the node (kubelet, kube-proxy, kube-scheduler, containerd, CNI, CoreDNS, crane, base images; Debian packages via apt-get), go-httpbin, Gitea and Keycloak (zip from Maven Central, pre-built for dev mode; a Java >= 21) into ~/.cache/keybroker (docs/development.md)
	@bash e2e/tools/build.sh

lint: ## cargo fmt --check and clippy with warnings denied
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

unit: ## Unit tests (no servers)
	$(CARGO) test --workspace --locked --lib --bins

# The same build as `unit` (workspace-wide features), so the short pass compiles nothing new.
fuzz-smoke: ## A short pass of every fuzz target: generated inputs, FUZZ_SMOKE_SECONDS (3) each, 0 panics, bounded time per input
	FUZZ_SMOKE_SECONDS=$(or $(FUZZ_SMOKE_SECONDS),3) $(CARGO) test --workspace --locked --lib -q -- --ignored --exact report::tests::fuzz_smoke --nocapture

# AFL++ through afl.rs on the stable toolchain; cargo-afl and AFL++ are built once into
# ~/.cache/keybroker/afl (needs make and a C compiler), the instrumented harness into $(TARGET_DIR)/afl.
fuzz: ## Coverage-guided fuzzing (AFL++) of every target: FUZZ_INPUTS (10^6) inputs each, then a table of inputs, time, panics and hangs
	TARGET_DIR=$(TARGET_DIR) bash fuzz/afl.sh --inputs $(or $(FUZZ_INPUTS),1000000) --seconds $(or $(FUZZ_SECONDS),1800) $(FUZZ_TARGETS)

e2e: tools release-static ## End-to-end tests: each test binary starts its own control plane (and MinIO, and a node running keybroker's images where it needs pods)
	$(CARGO) test --workspace --locked --test '*'

bench: tools sidecar-static ## Benchmarks against a real control plane (controller vs. plain-client floor; broker vs. direct STS and under hostile load; oauth2 tokens through the broker vs. direct token exchange at Keycloak; webhook vs. a fixed-response floor and under hostile load; sidecar RSS/CPU/start-up/size; gateway calls vs. direct to the upstream; the revocation drill with 1,000 sidecars), as tables
	$(CARGO) build -q --release --locked -p keybroker-operator -p keybroker-e2e --bins
	$(TARGET_DIR)/release/keybroker-bench controller
	$(TARGET_DIR)/release/keybroker-bench broker
	$(TARGET_DIR)/release/keybroker-bench oauth2
	$(TARGET_DIR)/release/keybroker-bench webhook
	$(TARGET_DIR)/release/keybroker-bench sidecar --sidecar $(STATIC_BIN)/keybroker-sidecar $(if $(IDLE_SECONDS),--idle-seconds $(IDLE_SECONDS))
	$(TARGET_DIR)/release/keybroker-bench gateway --sidecar $(STATIC_BIN)/keybroker-sidecar
	$(TARGET_DIR)/release/keybroker-bench revocation --sidecar $(STATIC_BIN)/keybroker-sidecar $(if $(SIDECARS),--sidecars $(SIDECARS))

# The sidecar as it ships: one static binary (musl libc, aws-lc compiled in), no runtime deps.
# Needs the Rust target (added here through rustup) and a musl C compiler for aws-lc:
# `apt-get install musl-tools` (Debian/Ubuntu) provides musl-gcc.
sidecar-static: ## Static musl release build of keybroker-sidecar -> $(STATIC_BIN)/
	@command -v musl-gcc >/dev/null || { echo "musl-gcc not found: apt-get install musl-tools (make tools installs it)"; exit 1; }
	@if command -v rustup >/dev/null; then rustup target add $(MUSL_TARGET) >/dev/null; fi
	CARGO_TARGET_DIR=$(STATIC_TARGET_DIR) $(CARGO) build -q --release --locked -p keybroker-sidecar --target $(MUSL_TARGET)
	@ls -l $(STATIC_BIN)/keybroker-sidecar

# What the Dockerfiles copy: both binaries static (musl), so the images need no libc at all.
# aws-lc (rustls' crypto in both) compiles its C with musl-gcc too.
release-static: ## Static musl release builds of keybroker-operator, kubectl-keybroker and keybroker-sidecar (into dist/, what the Dockerfile and the e2e images ship)
	@command -v musl-gcc >/dev/null || { echo "musl-gcc not found: apt-get install musl-tools (make tools installs it)"; exit 1; }
	@if command -v rustup >/dev/null; then rustup target add $(MUSL_TARGET) >/dev/null; fi
	@# Two builds, not one: features unify within a build, and the sidecar must not get the operator's.
	@echo "release-static: building keybroker-operator and kubectl-keybroker (release, musl; the first build takes about 13 min on 2 cores, later ones a few)"
	CARGO_TARGET_DIR=$(STATIC_TARGET_DIR) $(CARGO) build --release --locked -p keybroker-operator --bin keybroker-operator --bin kubectl-keybroker --target $(MUSL_TARGET)
	@echo "release-static: building keybroker-sidecar (release, musl)"
	CARGO_TARGET_DIR=$(STATIC_TARGET_DIR) $(CARGO) build --release --locked -p keybroker-sidecar --bin keybroker-sidecar --target $(MUSL_TARGET)
	@mkdir -p dist
	cp $(STATIC_BIN)/keybroker-operator $(STATIC_BIN)/kubectl-keybroker $(STATIC_BIN)/keybroker-sidecar dist/
	@ls -l dist/

crds: ## Regenerate crds/ (and the chart's copy) from the Rust types (tests fail when either is stale)
	$(CARGO) run -q --locked -p keybroker-operator --bin crdgen -- --out crds
	cp crds/*.yaml charts/keybroker/crds/

chart-lint: tools ## helm lint the chart (its values.schema.json included)
	@"$$(bash e2e/tools/build.sh --locate | sed -n 's/^KEYBROKER_BIN_HELM=//p')" lint --strict charts/keybroker

demo: tools release-static ## Narrated, on a real node: helm install with keybroker's images, examples/ running with the sidecar, uploads inside/outside their scope, a revocation drill; then tears down
	@$(CARGO) run -q --locked -p keybroker-e2e --bin keybroker-demo

cluster-up: tools release-static ## Start a one-node cluster (control plane, MinIO, kubelet + containerd) with keybroker installed by its chart in $(CLUSTER_DIR), left running; prints how to use it
	@$(CARGO) run -q --locked -p keybroker-e2e --bin keybroker-cluster -- up --dir $(CLUSTER_DIR) --node --keybroker

cluster-down: ## Stop what cluster-up started (node, pods, control plane) and delete $(CLUSTER_DIR)
	@$(CARGO) run -q --locked -p keybroker-e2e --bin keybroker-cluster -- down --dir $(CLUSTER_DIR)
