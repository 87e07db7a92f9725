# blockserve developer commands. `make serve` runs the cluster, `make test` runs lint and the whole suite.

VENV ?= .venv
PY := $(VENV)/bin/python
# Touched after a successful install; remade whenever pyproject.toml changes, so `make venv` is fast otherwise.
STAMP := $(VENV)/.blockserve-installed
PROTO := protos/blockserve/v1/blockserve.proto

# pip must reach the package registries, so it gets the caller's proxy settings, saved here before the
# loopback overrides below (a variable the caller did not set is removed for pip).
PIP_ENV := env $(if $(http_proxy),http_proxy='$(http_proxy)',-u http_proxy) \
	$(if $(https_proxy),https_proxy='$(https_proxy)',-u https_proxy) \
	$(if $(no_proxy),no_proxy='$(no_proxy)',-u no_proxy)

# Ray must never reach beyond loopback (same values as cluster/env.py LOOPBACK_ENV, which says why each is
# needed): no usage stats, no token auth for local clusters, a dead proxy so Ray's cloud-metadata probe fails
# at once instead of leaving the machine, and a single-node cluster so Ray binds 127.0.0.1.
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE := disabled
export http_proxy := http://127.0.0.1:9
export https_proxy := http://127.0.0.1:9
export no_proxy := localhost,127.0.0.1,::1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: venv protos lint test test-fast serve tiny-model bench helm-schema serve-config

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP_ENV) $(PY) -m pip install --quiet -e '.[test]'
	touch $@

# Generated imports are package-absolute (`from protos.blockserve.v1 import blockserve_pb2`) because the
# proto path is given relative to the repo root (-I .). tests/protos/test_protos_fresh.py checks freshness.
protos: venv
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. $(PROTO)
	$(PY) -c "from protos.blockserve.v1 import blockserve_pb2_grpc"

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: venv lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-fast: venv
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

serve: venv
	$(VENV)/bin/blockserve serve $(if $(CONFIG),--config $(CONFIG))

# The Helm chart's values.schema.json, generated from cluster/config.py (tests/helm fails while it is stale).
helm-schema: venv
	$(VENV)/bin/blockserve helm-schema --output helm/blockserve/values.schema.json

# The Serve config document `make serve` deploys and the chart embeds (CONFIG=cluster.yaml to choose).
serve-config: venv
	$(VENV)/bin/blockserve render-serve-config $(if $(CONFIG),--config $(CONFIG))

tiny-model: venv
	$(PY) -m model.training.train_tiny

# Every bench/*.py script (not _private helpers), in name order; each prints its own figures.
bench: venv
	@set -e; for script in $(sort $(filter-out bench/_%,$(wildcard bench/*.py))); do \
		echo "== $$script"; $(PY) $$script; \
	done
