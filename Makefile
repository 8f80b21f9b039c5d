# celery-fleet developer entry points. `make demo` and `make test` are the two a newcomer needs.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export KUBECONFIG := $(CURDIR)/.local/kubeconfig
export PATH := $(CURDIR)/.local/bin:$(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: help
help: ## list targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@# The local runtime (dev/celery_fleet_localrun) is development only: on the path, not in the wheel.
	$(PY) -c 'import pathlib, sys, sysconfig; pathlib.Path(sysconfig.get_path("purelib"), "celery-fleet-dev.pth").write_text(sys.argv[1] + "\n")' '$(CURDIR)/dev'
	touch $@

.PHONY: install
install: $(STAMP) ## virtualenv with the project and dev deps (.venv)

.PHONY: install-system
install-system: ## system packages the tests need (redis-server, redis-sentinel, promtool from prometheus)
	@command -v redis-server >/dev/null && command -v redis-sentinel >/dev/null && command -v promtool >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  pkgs="redis-server redis-sentinel prometheus"; \
	  $$SUDO apt-get install -y -q --no-install-recommends $$pkgs || \
	    { $$SUDO apt-get update -q && $$SUDO apt-get install -y -q --no-install-recommends $$pkgs; }; }

.PHONY: binaries
binaries: ## build the control-plane binaries into the cache (slow the first time)
	hack/build-binaries.sh

.PHONY: cluster-up
cluster-up: ## start the local control plane (kwokctl binary runtime) -> .local/kubeconfig
	hack/cluster.sh up

.PHONY: cluster-down
cluster-down: ## stop and delete the local control plane
	hack/cluster.sh down

.PHONY: crds
crds: generate ## regenerate CRDs (crds/, the chart's and deploy/'s copies) from the pydantic models

.PHONY: generate
generate: install ## regenerate every generated file: CRDs (crds/, chart, deploy/), RBAC (chart, deploy/), the chart README
	$(PY) -m celery_fleet.api.crdgen
	$(PY) -m celery_fleet.rbac
	$(PY) -m celery_fleet.chartdoc

.PHONY: verify
verify: install ## fail when generated files are stale
	$(PY) -m celery_fleet.api.crdgen --check
	$(PY) -m celery_fleet.rbac --check
	$(PY) -m celery_fleet.chartdoc --check

.PHONY: lint
lint: install ## ruff + import layering
	$(VENV)/bin/ruff check operator dev tests bench
	$(VENV)/bin/ruff format --check operator dev tests bench
	$(VENV)/bin/lint-imports

.PHONY: typecheck
typecheck: install ## mypy --strict on the package
	$(VENV)/bin/mypy

.PHONY: unit
unit: install ## unit tests only
	$(VENV)/bin/pytest tests/unit -q

.PHONY: image-tools
image-tools: ## the daemonless image builder from Debian's packages (buildah, podman, mmdebstrap), unless a Docker engine runs
	hack/image.sh tools

.PHONY: image
image: image-tools ## build the operator image (docker build, else buildah on a cached local Debian base)
	hack/image.sh build

.PHONY: test
test: install install-system binaries image-tools lint typecheck verify ## the whole suite: lint, types, generated files, unit + integration (the image tests build it)
	$(VENV)/bin/pytest tests -q --durations=15

.PHONY: demo
demo: install install-system binaries cluster-up ## bring up the local cluster and Redis, and show how to reach them
	hack/demo.sh

.PHONY: bench
bench: install install-system binaries ## benchmarks; results in bench/results/
	hack/bench.sh
