# quotad developer targets. `make help` lists them.
#
# Everything installs into the repository: the virtualenv in .venv, Go tools and protoc
# plugins in .tools/bin, Maven's downloads in .tools/m2, npm's in clients/typescript.
# A fresh Debian machine with Python 3.11+, Go, Node 20+ and Java 17+ with Maven needs
# nothing else. After changing a version below, `make clean` reinstalls.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TOOLS := $(CURDIR)/.tools/bin
GRPCURL_VERSION := v1.9.3
# The fault-injection suite (tests/faults) puts Shopify's toxiproxy between quotad and Redis.
TOXIPROXY_VERSION := v2.5.0
# Code generation of the committed stubs (buf.gen.yaml: Python, Go). The TypeScript and Java
# clients generate theirs in their own builds, with versions pinned in package.json and pom.xml.
PROTOC_GEN_GO_VERSION := v1.36.12
PROTOC_GEN_GO_GRPC_VERSION := v1.6.2
MVN := mvn -B -q -Dmaven.repo.local=$(CURDIR)/.tools/m2
TS_DEPS := clients/typescript/node_modules/.package-lock.json
# helm for the chart's tests. No package registry this project installs from ships the helm CLI
# (PyPI and npm carry SDK bindings only, Debian no helm), so it is built from source: about 5 CPU
# minutes on a cold Go build cache, which `make test` overlaps with the other installs.
HELM_VERSION := v4.3.2
# The benchmark's peer: envoyproxy/ratelimit at a pinned commit (a Go pseudo-version; it tags rarely).
ENVOY_RATELIMIT_VERSION := v1.4.1-0.20260122083618-3fb702589d36
POLICY ?= server/quotad_server/examples/policy.yaml
export PATH := $(TOOLS):$(CURDIR)/$(BIN):$(PATH)

.PHONY: help install tools bench-tools bench-peers run test lint typecheck pytest proto proto-breaking clients bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-15s %s\n", $$1, $$2}'

install: $(VENV)/.installed ## create .venv with the server, the client and the dev tools

$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e clients/python -e '.[dev]'
	touch $@

tools: $(TOOLS)/grpcurl $(TOOLS)/quotad-envoy-conformance $(TOOLS)/toxiproxy-server $(TOOLS)/protoc-gen-go $(TOOLS)/protoc-gen-go-grpc $(TS_DEPS) $(TOOLS)/helm bench-tools ## install grpcurl, the Envoy conformance client, toxiproxy, the pinned protoc plugins, helm and the benchmark tools

$(TOOLS)/grpcurl:
	GOBIN=$(TOOLS) go install github.com/fullstorydev/grpcurl/cmd/grpcurl@$(GRPCURL_VERSION)

# Installed as `server`, a name too plain for a shared bin directory: renamed.
$(TOOLS)/toxiproxy-server:
	GOBIN=$(CURDIR)/.tools/dl go install github.com/Shopify/toxiproxy/v2/cmd/server@$(TOXIPROXY_VERSION)
	install -D -m 0755 .tools/dl/server $@

bench-tools: $(TOOLS)/quotad-loadgen ## build the load generator; add redis-cli (Debian redis-tools) if missing
	@command -v redis-cli >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get install -y -q redis-tools >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null && apt-get install -y -q redis-tools >/dev/null)); } || \
	  echo "redis-cli not installed: the benchmark will skip the raw Redis ceiling"
	@# The TLS test makes its certificates with openssl (in Debian's base image, but not everywhere).
	@command -v openssl >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get install -y -q openssl >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null && apt-get install -y -q openssl >/dev/null)); } || \
	  echo "openssl not installed: the Redis TLS test will say so"

bench-peers: $(TOOLS)/envoy-ratelimit ## install the benchmark's peers: envoyproxy/ratelimit (pinned)

# Installed as `service_cmd`, a name too plain for a shared bin directory: renamed.
$(TOOLS)/envoy-ratelimit:
	GOBIN=$(CURDIR)/.tools/dl/envoy-ratelimit go install \
		github.com/envoyproxy/ratelimit/src/service_cmd@$(ENVOY_RATELIMIT_VERSION)
	install -D -m 0755 .tools/dl/envoy-ratelimit/service_cmd $@

$(TOOLS)/quotad-loadgen: bench/loadgen/main.go bench/loadgen/go.mod bench/loadgen/go.sum
	cd bench/loadgen && go build -o $(TOOLS)/quotad-loadgen .

# The Envoy conformance client (tests/envoy): go-control-plane's stubs, downloaded by this build.
$(TOOLS)/quotad-envoy-conformance: tests/envoy/conformance/main.go tests/envoy/conformance/go.mod tests/envoy/conformance/go.sum
	cd tests/envoy/conformance && go mod download && go build -o $(TOOLS)/quotad-envoy-conformance .

$(TOOLS)/protoc-gen-go:
	GOBIN=$(TOOLS) go install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION)

$(TOOLS)/protoc-gen-go-grpc:
	GOBIN=$(TOOLS) go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@$(PROTOC_GEN_GO_GRPC_VERSION)

# The TypeScript client's dependencies, buf and ts-proto (its protoc plugin) among them.
$(TS_DEPS): clients/typescript/package.json clients/typescript/package-lock.json
	cd clients/typescript && npm ci --no-audit --no-fund --loglevel=error

clients: install tools ## build the TypeScript, Go and Java clients (fetching their dependencies, generating their stubs)
	cd clients/typescript && npm run --silent build
	cd clients/go && go vet ./...
	cd clients/java && $(MVN) test-compile
$(TOOLS)/helm:
	GOBIN=$(TOOLS) go install -ldflags="-s -w" helm.sh/helm/v4/cmd/helm@$(HELM_VERSION)

# The embedded Redis is for development only, so it is asked for by name (QUOTAD_EMBEDDED_REDIS);
# with QUOTAD_REDIS_URL set, `make run` uses that Redis instead.
run: install ## serve on localhost:50051 with the example policy and an embedded Redis
	QUOTAD_POLICY=$(POLICY) QUOTAD_LISTEN=$${QUOTAD_LISTEN:-127.0.0.1:50051} \
	QUOTAD_EMBEDDED_REDIS=$$([ -n "$${QUOTAD_REDIS_URL:-}" ] && echo false || echo true) $(BIN)/quotad serve

# The installs run side by side (compiling helm and the Go tools takes the CPU while pip, npm and
# Maven wait on downloads); the checks run one after another, with the machine to themselves.
test: ## everything CI checks: lint, types, proto, all tests
	$(MAKE) -j4 --output-sync=target install tools
	$(MAKE) lint typecheck pytest

lint: install proto-breaking ## ruff, ruff format, buf lint, buf breaking
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	cd proto && $(CURDIR)/$(BIN)/buf lint

proto-breaking: install ## buf breaking: proto/ against the previous commit (QUOTAD_PROTO_BASE=<ref> for another)
	BUF=$(CURDIR)/$(BIN)/buf scripts/proto_breaking.sh

typecheck: install ## mypy --strict over the server, the client and the tests
	$(BIN)/mypy

pytest: install tools clients ## unit, integration, e2e and every client's tests (real Valkey, real gRPC)
	$(BIN)/pytest -q

# With envoyproxy/ratelimit beside quotad when it installs (it needs the Go module proxy).
bench: install bench-tools ## the benchmark: quotad vs envoy ratelimit, the no-op gRPC and raw Redis ceilings, 3 runs
	@$(MAKE) --no-print-directory bench-peers || echo "envoy ratelimit did not install: the benchmark runs without it"
	$(BIN)/python bench/run.py $$([ -x $(TOOLS)/envoy-ratelimit ] && echo --peers envoy,envoy-cache) $(BENCH_ARGS)

proto: install tools ## regenerate the committed Python and Go stubs from proto/ (buf generate, buf.gen.yaml)
	$(BIN)/buf generate

clean: ## remove the virtualenv and the tools
	rm -rf $(VENV) .tools .mypy_cache .ruff_cache .pytest_cache
	rm -rf clients/typescript/node_modules clients/typescript/dist clients/java/target
