# usage-billing: the two commands are `make run` and `make test`.
SHELL := /bin/bash
# Any Python 3.11 or newer: `make PYTHON=python3.12 run`. Default python3.11, or
# python3 where there is no python3.11.
ifeq ($(origin PYTHON),undefined)
PYTHON := $(shell python3.11 -c '' >/dev/null 2>&1 && echo python3.11 || echo python3)
endif
VENV := .venv
PY := $(VENV)/bin/python
# Three pinned locks (requirements/*.in -> *.lock, `make lock`): runtime (what the
# image installs), dev (runtime + tests, lint, codegen), k8s (make k8s-check).
STAMP := $(VENV)/.installed
K8S_STAMP := $(VENV)/.installed-k8s
LOCK_VENV := /tmp/ub-lock

# PYTHON named on the command line (or in the environment) and the venv made by
# another Python version: rebuild the venv with the one named.
VERSION_OF = $(shell $(1) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
ifneq ($(filter command environment,$(firstword $(origin PYTHON))),)
ifneq ($(wildcard $(PY)),)
ifneq ($(call VERSION_OF,$(PY)),$(call VERSION_OF,$(PYTHON)))
REBUILD_VENV := 1
endif
endif
endif

.PHONY: setup run test test-unit lint proto-lint proto proto-check bench fuzz lock clean k8s-check image-check python-check FORCE

setup: $(STAMP)

python-check:
	@v=$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])') || { \
	    echo "make: cannot run $(PYTHON): usage-billing needs Python 3.11 or newer (make PYTHON=python3.12 ...)"; exit 1; }; \
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	    echo "make: $(PYTHON) is Python $$v: usage-billing needs 3.11 or newer (make PYTHON=python3.12 ...)"; exit 1; }

# Runtime + dev (what run, test, lint and bench need). Both locks on one command
# line: pip refuses them if they disagree. No Kubernetes tooling: see k8s-check.
$(STAMP): requirements/runtime.lock requirements/dev.lock $(if $(REBUILD_VENV),FORCE)
	@$(MAKE) --no-print-directory python-check
	$(if $(REBUILD_VENV),rm -rf $(VENV))
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check \
	    -r requirements/runtime.lock -r requirements/dev.lock
	# Put the checkout on the venv's path, so scripts anywhere import services/ and usagebilling/.
	echo "$(CURDIR)" > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/usage-billing.pth"
	touch $(STAMP)

# Kubernetes tooling (kubectl, Helm, schemas: about 420 MB), into the same venv:
# only for `make k8s-check`, which type-checks, runs and tests tools/k8s_check.py.
$(K8S_STAMP): $(STAMP) requirements/k8s.lock
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements/k8s.lock
	touch $(K8S_STAMP)

proto: $(STAMP)
	tools/gen_protos.sh

# Fails when the committed generated code (usagebilling/, with openapi.json,
# and docs/reference.md) differs from what protos/ generates.
proto-check: $(STAMP)
	@tmp=$$(mktemp -d); tools/gen_protos.sh $$tmp; \
	if diff -r -x __pycache__ $$tmp/usagebilling usagebilling && diff $$tmp/docs/reference.md docs/reference.md; \
	then echo "generated code is up to date"; \
	else echo "generated code drifted from protos/: run 'make proto' and commit"; rm -rf $$tmp; exit 1; fi; \
	rm -rf $$tmp

run: $(STAMP)
	$(PY) -m tools.run_suite $(RUN_ARGS)

# tests/deploy/test_k8s_check.py skips (saying why) without the Kubernetes
# tooling; `make k8s-check` runs it.
test: $(STAMP) proto-check
	$(PY) -m tools.with_stack $(PY) -m pytest -q -rfEs $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

# buf lint (STANDARD rules, API.md's exceptions in buf.yaml); buf comes from the npm registry.
proto-lint:
	npx --yes @bufbuild/buf@1.75.0 lint

# tools/k8s_check.py imports the Kubernetes tooling: `make k8s-check` type-checks it.
lint: $(STAMP) proto-lint
	$(VENV)/bin/ruff check services tools tests bench
	$(VENV)/bin/ruff format --check services tools tests bench
	$(VENV)/bin/mypy services tools bench --exclude '^tools/k8s_check\.py$$'

# Renders deploy/k8s (kustomize overlays, Helm chart) offline and checks every
# object against the Kubernetes 1.31 schemas and the services' settings; then
# the tests of that check and of the shipped monitoring (which `make test`
# skips without this tooling).
k8s-check: $(K8S_STAMP)
	$(VENV)/bin/mypy tools/k8s_check.py
	$(PY) -m tools.k8s_check
	$(PY) -m pytest -q -rfEs tests/deploy/test_k8s_check.py tests/deploy/test_monitoring.py

bench: $(STAMP)
	$(PY) -m bench.run

# Every RPC of the three services, 20,000 generated, mutated and raw requests on
# a private stack (tools/fuzz.py); fails on INTERNAL, UNKNOWN, a call over 5 s or
# a traceback in a log. FUZZ_ARGS="--seed 2 --requests 50000" for another run.
fuzz: $(STAMP)
	$(PY) -m tools.fuzz $(FUZZ_ARGS)

# The image built without Docker (tools/image_check.py): a fresh venv outside
# the checkout from requirements/runtime.lock with the Dockerfile's pip flags,
# the app copied beside it; each service's migrate, then each service started
# until its health check answers SERVING, on a private PostgreSQL and NATS.
image-check: $(STAMP)
	$(PY) -m tools.with_stack $(PY) -m tools.image_check $(IMAGE_CHECK_ARGS)

# Each lock is the `pip freeze` of a fresh venv that installed only its .in
# file, constrained by the lock before it (so a package in two locks has one
# version). dev keeps setuptools (grpcio-tools needs it); runtime needs none.
# $(call freeze,NAME,CONSTRAINING-LOCK,FREEZE-FLAGS)
define freeze
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet -r requirements/$(1).in $(if $(2),-c requirements/$(2).lock)
	{ echo '# Pinned by `make lock` from requirements/$(1).in (what CI tested); do not edit.'; \
	  $(LOCK_VENV)/bin/pip freeze $(3); } > requirements/$(1).lock
endef

lock:
	$(call freeze,runtime,,)
	$(call freeze,dev,runtime,--all --exclude pip)
	$(call freeze,k8s,dev,)
	rm -rf $(LOCK_VENV)

clean:
	rm -rf $(VENV) .run
