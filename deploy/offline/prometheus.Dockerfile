# Prometheus from Debian's `prometheus` package, for running the compose stack
# where no container registry can be reached (docker-compose.offline.yml builds
# it on the same local Debian base as the router image). It runs like the
# official prom/prometheus image: the server is the entrypoint, the config is
# /etc/prometheus/prometheus.yml, the data /prometheus, the user nobody, port
# 9090, so docker-compose.yml's prometheus service (command, mounts) applies to
# either image. Debian bookworm ships Prometheus 2.42.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN set -eu; \
    apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus; \
    apt-get clean; \
    rm -rf /var/lib/apt/lists/*; \
    mkdir -p /prometheus; \
    chown nobody:nogroup /prometheus; \
    prometheus --version
USER nobody
WORKDIR /prometheus
VOLUME ["/prometheus"]
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
