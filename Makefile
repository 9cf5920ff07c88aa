# The two commands of the README: `make run` and `make test`. Both set up
# everything on a fresh machine (virtualenv, dependencies, demo model).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= models/ctr
DEMO_STAMP := $(DEMO_DIR)/.built-stamp
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: install demo run test protos bench-worker bench-router bench-tls bench-processes bench-state bench-reqlog bench-batching bench-rollout bench-quotas \
	loadtest compose-up compose-test compose-down clean

# Also Debian's jemalloc (for `workers.allocator: jemalloc`) when it is missing and
# we are root with apt-get; never fails the build: without it only that setting is
# unavailable. A fresh image has no package lists, hence the update-and-retry.
install: $(STAMP)
	@dpkg -s libjemalloc2 >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		{ DEBIAN_FRONTEND=noninteractive apt-get install -y -q libjemalloc2 || \
		  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q libjemalloc2; }; }; } || \
		echo "note: could not install libjemalloc2; workers.allocator: jemalloc will be unavailable"
	@# Also Debian's prometheus package (promtool, /usr/bin/prometheus) for tests/deploy, when missing
	@# and we are root with apt-get; never fails the build: without it those tests fail and say how to fix it.
	@{ command -v promtool && command -v prometheus; } >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		{ DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus || \
		  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus; }; }; } || \
		echo "note: could not install Debian's prometheus package; tests/deploy fail until promtool and prometheus are installed"
	@# Also Debian's etcd-server (state.backend: etcd; tests/router/test_router_state.py starts its own member),
	@# when missing and we are root with apt-get; never fails the build: without it those tests fail and say so.
	@command -v etcd >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		{ DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends etcd-server || \
		  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends etcd-server; }; }; } || \
		echo "note: could not install Debian's etcd-server; the etcd state tests fail until etcd is installed"
	@# Also Debian's docker-compose (compose v1) for tests/deploy/test_compose_config.py: `docker-compose config -q`
	@# validates docker-compose.yml offline, without an engine. --no-install-recommends, or apt brings docker.io along.
	@command -v docker-compose >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		{ DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker-compose || \
		  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker-compose; }; }; } || \
		echo "note: could not install docker-compose; tests/deploy/test_compose_config.py fails until it is installed"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[worker,dev]'
	touch $(STAMP)

demo: $(DEMO_STAMP)

$(DEMO_STAMP): $(STAMP) workers/demo_model.py
	$(PY) -m workers.demo_model --out $(DEMO_DIR) --versions 1 2
	touch $(DEMO_STAMP)

run: install demo
	$(PY) -m router serve

test: install demo
	$(PY) -m mypy
	$(PY) -m pytest

protos: install
	$(PY) -m protos.build

bench-worker: install
	$(PY) -m loadtest.bench_worker

bench-router: install demo
	$(PY) -m loadtest.bench_router

bench-tls: install demo
	$(PY) -m loadtest.bench_tls

# wrk (Debian's) drives REST at c=64; installed here when missing (needs root, as the other apt steps)
bench-processes: install demo
	@command -v wrk >/dev/null || (DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk >/dev/null)
	@command -v h2load >/dev/null || (DEBIAN_FRONTEND=noninteractive apt-get install -y -q nghttp2-client >/dev/null)
	$(PY) -m loadtest.bench_processes

bench-state: install demo
	$(PY) -m loadtest.bench_state

bench-reqlog: install demo
	@command -v h2load >/dev/null || (DEBIAN_FRONTEND=noninteractive apt-get install -y -q nghttp2-client >/dev/null)
	$(PY) -m loadtest.bench_reqlog

bench-batching: install demo
	$(PY) -m loadtest.bench_batching

bench-quotas: install demo
	$(PY) -m loadtest.bench_quotas

# Builds a ~300 MB CTR model into models/ctr-large the first time (a few seconds).
bench-rollout: install
	$(PY) -m loadtest.bench_rollout

# Locust against a router already running (make run) on the default ports.
LOCUST_ARGS ?= --headless -u 64 -r 16 -t 60s
loadtest: install
	$(PY) -m locust -f loadtest/locustfile.py --host http://localhost:8501 $(LOCUST_ARGS)

# The docker-compose stack, brought up with podman on a machine without Docker or a registry
# (deploy/compose.sh says how): up and leave running, or up, check and tear down.
compose-up: install
	bash deploy/compose.sh up

compose-test: install
	bash deploy/compose.sh test

compose-down:
	bash deploy/compose.sh down

clean:
	-bash deploy/compose.sh clean
	rm -rf $(VENV) models build *.egg-info
