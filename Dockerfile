# tfs-router: one image for the router and the worker processes it spawns (they
# run inside the same container, as `make run` runs them on a host).
#
#   docker build -t tfs-router .                              # router (+ workers)
#   docker build -t tfs-router-locust --target locust .       # + locust, for the load generator
#   docker run -v models:/models -p 8500:8500 -p 8501:8501 tfs-router
#
# BASE_IMAGE is any Debian bookworm-like image. The official python:3.11-slim
# (the default) brings CPython 3.11 with pip; a bare Debian base (debian:bookworm,
# or a `debootstrap --variant=minbase bookworm` root imported as an image, which
# is what deploy/compose.sh builds on when no registry is reachable) gets
# Debian's python3, which is 3.11 in bookworm. Either way the project goes into a
# virtualenv (/opt/venv), so Debian's "externally managed" pip never objects.
#
# Models come from a volume at /models (TF Serving's layout: /models/<name>/<version>/);
# the config from /etc/tfs-router/config.yaml (configs/compose.yaml is baked in as
# the default; docker-compose.yml mounts it over, so edits need no rebuild).
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS router

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2

# Python 3.11 with venv support: the base's own if it has it, else Debian's.
RUN set -eu; \
    if command -v python3.11 >/dev/null 2>&1 && python3.11 -c 'import ensurepip, venv' >/dev/null 2>&1; then \
        echo "using the base image's $(python3.11 --version)"; \
    else \
        command -v apt-get >/dev/null 2>&1 || { echo "BASE_IMAGE has no python3.11 and no apt-get" >&2; exit 1; }; \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv ca-certificates; \
        apt-get clean; \
        rm -rf /var/lib/apt/lists/*; \
        python3.11 --version || { echo "this base's python3 is not 3.11 (the project needs 3.11): use a bookworm base" >&2; exit 1; }; \
    fi; \
    python3.11 -m venv /opt/venv; \
    /opt/venv/bin/python -m pip install --upgrade pip

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Dependencies first, read from pyproject.toml alone (TensorFlow included): this
# ~2.2 GB layer is rebuilt only when pyproject.toml changes, not on every code change.
WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(['setuptools>=68', 'wheel'] + p['dependencies'] + p['optional-dependencies']['worker']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The project itself: `pip install .[worker]` (everything it needs is already there).
COPY README.md ./
COPY protos ./protos
COPY shared ./shared
COPY workers ./workers
COPY router ./router
COPY configs ./configs
RUN pip install --no-build-isolation '.[worker]' \
    && rm -rf build *.egg-info \
    && tfs-router serve --help >/dev/null

# An unprivileged user; /models belongs to it so a fresh named volume mounted
# there does too (the model-init service writes the demo model into it). No
# VOLUME instruction: it would give every container of this image (locust's too)
# an anonymous volume; compose names the volume.
RUN groupadd --system --gid 10001 tfs \
    && useradd --system --uid 10001 --gid tfs --home-dir /home/tfs --create-home --shell /usr/sbin/nologin tfs \
    && mkdir -p /models /etc/tfs-router \
    && chown tfs:tfs /models \
    && cp /src/configs/compose.yaml /etc/tfs-router/config.yaml
USER tfs
WORKDIR /home/tfs
EXPOSE 8500 8501

# Ready (HTTP 200) once every model has an AVAILABLE version on some worker.
# Slim images have no curl: Python's urllib does it (a 503 raises, exit 1).
HEALTHCHECK --interval=10s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8501/readyz', timeout=4)"]

CMD ["tfs-router", "serve", "--config", "/etc/tfs-router/config.yaml"]


# The load generator: the same image plus locust (its version range from
# pyproject.toml's dev extra), so the locustfile's imports (the project's protos
# and tensor codec, grpcio, numpy) are all there. It adds one ~45 MB layer on top
# of the router image's layers, which it shares.
FROM router AS locust
USER root
RUN python -c "import tomllib; d = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['optional-dependencies']['dev']; \
print('\n'.join(r for r in d if r.startswith('locust')))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt \
    && locust --version
USER tfs
EXPOSE 8089
HEALTHCHECK NONE
ENTRYPOINT ["locust"]
CMD ["-f", "/mnt/locust/locustfile.py", "--host", "http://router:8501"]
