# quotad developer targets. `make help` lists them.
#
# Everything installs into the repository: the virtualenv in .venv, Go tools in .tools/bin.
# A fresh Debian machine with Python 3.11+ and Go needs nothing else.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TOOLS := $(CURDIR)/.tools/bin
GRPCURL_VERSION := v1.9.3
HELM_VERSION := v3.22.0
POLICY ?= server/quotad_server/examples/policy.yaml
export PATH := $(TOOLS):$(CURDIR)/$(BIN):$(PATH)

.PHONY: help install tools run test lint typecheck pytest proto proto-check clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

install: $(VENV)/.installed ## create .venv with the server, the client and the dev tools

$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e clients/python -e '.[dev]'
	touch $@

tools: $(TOOLS)/grpcurl $(TOOLS)/helm ## install grpcurl and helm (from the Go module proxy) into .tools/bin

$(TOOLS)/grpcurl:
	GOBIN=$(TOOLS) go install github.com/fullstorydev/grpcurl/cmd/grpcurl@$(GRPCURL_VERSION)

$(TOOLS)/helm:
	GOBIN=$(TOOLS) go install helm.sh/helm/v3/cmd/helm@$(HELM_VERSION)

run: install ## serve on localhost:50051 with the example policy and an embedded Redis
	QUOTAD_POLICY=$(POLICY) QUOTAD_LISTEN=$${QUOTAD_LISTEN:-127.0.0.1:50051} $(BIN)/quotad serve

test: install tools lint typecheck pytest ## everything CI checks: lint, types, proto, all tests

lint: install ## ruff, ruff format, buf lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	cd proto && $(CURDIR)/$(BIN)/buf lint

typecheck: install ## mypy --strict over the server, the client and the tests
	$(BIN)/mypy

pytest: install tools ## unit, integration and e2e tests (real Valkey, real gRPC)
	$(BIN)/pytest -q

proto: install ## regenerate the Python stubs from proto/
	$(BIN)/python scripts/genproto.py

clean: ## remove the virtualenv and the tools
	rm -rf $(VENV) .tools .mypy_cache .ruff_cache .pytest_cache
