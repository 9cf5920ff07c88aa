#!/usr/bin/env bash
# The docker-compose stack on this kind of machine: Debian, root, no Docker
# engine and no reachable container registry.
#
#   deploy/compose.sh up      # make compose-up: build what is missing, start the stack, leave it running
#   deploy/compose.sh test    # make compose-test: up, checks, 30 s of locust, Prometheus checks, all down
#   deploy/compose.sh down    # stop the stack, drop its containers, network and volumes
#   deploy/compose.sh clean   # down, then drop the images and the container storage too
#
# How (each step is skipped when its result is already there):
#   1. Debian's podman with runc (crun refuses this machine's hybrid cgroup
#      layout), netavark + aardvark-dns (service names resolve), iptables,
#      catatonit (compose `init: true`), debootstrap.
#   2. podman-compose from PyPI into the project's virtualenv.
#   3. podman's configuration, written under $TFS_CONTAINERS_DIR (default:
#      build/containers/) and selected with CONTAINERS_CONF,
#      CONTAINERS_STORAGE_CONF and CONTAINERS_REGISTRIES_CONF; nothing in /etc
#      is edited. Images, layers and volumes live there too.
#   4. A Debian bookworm base image (no registry to pull python:3.11-slim
#      from): `debootstrap --variant=minbase` from the machine's own Debian
#      mirror, with the machine's locally added CA certificates (outgoing TLS
#      passes a proxy only they trust), `podman import`ed as
#      localhost/tfs-router-base:bookworm. Made once.
#   5. The images, on that base (--build-arg BASE_IMAGE): tfs-router and
#      tfs-router-locust from ./Dockerfile, tfs-router-prometheus:offline from
#      deploy/offline/prometheus.Dockerfile. podman's layer cache makes a
#      rebuild with nothing changed take seconds.
#   6. podman-compose -f docker-compose.yml -f docker-compose.offline.yml:
#      Prometheus built from Debian's package, Grafana left out (its image can
#      only be pulled).
#
# Podman's ways, as met here:
#   - HEALTHCHECKs run on systemd timers, and there is no systemd here: podman
#     logs "unable to get systemd connection" and the router stays "starting";
#     compose-test runs the check once by hand (podman healthcheck run).
#   - podman-compose turns depends_on into podman's --requires, so starting the
#     router (re)starts model-init, which returns at once when the model is there.
#     Its service_completed_successfully waits for model-init to stop without
#     looking at the exit code: stack_up does.
#   - podman writes a small blob-info cache to /var/lib/containers/cache whatever
#     storage.conf says (podman import, podman build).
#
# Environment: TFS_CONTAINERS_DIR (podman's config and storage), VENV (the
# virtualenv for podman-compose, default .venv), COMPOSE_PROJECT (tfs-router),
# LOCUST_USERS/LOCUST_TIME (compose-test's load: 16 users for 30s).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

STATE=${TFS_CONTAINERS_DIR:-$ROOT/build/containers}
mkdir -p "$STATE"
STATE=$(cd "$STATE" && pwd)
# Run-time state (locks, sockets) on a short path: unix socket paths are
# limited to 108 bytes, and a work tree's path can be long.
RUNDIR=/run/tfs-router-containers/$(printf '%s' "$STATE" | sha256sum | cut -c1-12)
VENV=${VENV:-$ROOT/.venv}
PROJECT=${COMPOSE_PROJECT:-tfs-router}
PODMAN_COMPOSE_VERSION=1.6.0
SUITE=bookworm  # Debian's release whose python3 is 3.11 (pyproject.toml: >=3.11,<3.12)
BASE=localhost/tfs-router-base:$SUITE
ROUTER_IMAGE=localhost/tfs-router:latest
LOCUST_IMAGE=localhost/tfs-router-locust:latest
PROMETHEUS_IMAGE=localhost/tfs-router-prometheus:offline
COMPOSE_FILES=(-f docker-compose.yml -f docker-compose.offline.yml)
APT_PACKAGES=(podman runc netavark aardvark-dns iptables catatonit debootstrap)
LOCUST_USERS=${LOCUST_USERS:-16}
LOCUST_TIME=${LOCUST_TIME:-30s}

export CONTAINERS_CONF=$STATE/containers.conf
export CONTAINERS_STORAGE_CONF=$STATE/storage.conf
export CONTAINERS_REGISTRIES_CONF=$STATE/registries.conf
export BUILDAH_FORMAT=docker  # keep HEALTHCHECK (the OCI format has no such field)
export BASE_IMAGE=$BASE       # docker-compose*.yml's build args, should podman-compose build

STARTED=$SECONDS
PHASE_NAMES=()
PHASE_SECONDS=()
phase_start=$SECONDS

log() { printf '[compose %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
phase() {  # phase NAME: close the phase running since the last call under NAME
    PHASE_NAMES+=("$1")
    PHASE_SECONDS+=($((SECONDS - phase_start)))
    log "$1: $((SECONDS - phase_start)) s"
    phase_start=$SECONDS
}
timings() {
    local i
    printf '\n%-28s %6s\n' "phase" "s"
    for i in "${!PHASE_NAMES[@]}"; do
        printf '%-28s %6d\n' "${PHASE_NAMES[$i]}" "${PHASE_SECONDS[$i]}"
    done
    printf '%-28s %6d\n' "total" $((SECONDS - STARTED))
}

# ---------------------------------------------------------------------------
# 1-3: tools and configuration
# ---------------------------------------------------------------------------

apt_install() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" ||
        { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"; }
}

ensure_packages() {
    [ "$(id -u)" = 0 ] || die "run as root: rootful podman (debootstrap needs root as well)"
    local missing=() pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        log "installing ${missing[*]}"
        apt_install "${missing[@]}" >"$STATE/apt.log" 2>&1 || { tail -20 "$STATE/apt.log" >&2; die "apt-get install failed"; }
    fi
}

ensure_podman_compose() {
    if [ -x "$VENV/bin/podman-compose" ] &&
        [ "$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("podman-compose"))' 2>/dev/null)" = "$PODMAN_COMPOSE_VERSION" ]; then
        return
    fi
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    log "installing podman-compose $PODMAN_COMPOSE_VERSION into $VENV"
    "$VENV/bin/python" -m pip install --quiet "podman-compose==$PODMAN_COMPOSE_VERSION" >"$STATE/pip.log" 2>&1 ||
        { cat "$STATE/pip.log" >&2; die "pip install podman-compose failed"; }
}

limit() {  # limit n|u: the ulimit a container gets: the hard limit (containers may not raise it)
    local value
    value=$(ulimit -H"$1")
    if [ "$value" = unlimited ]; then
        [ "$1" = n ] && value=1048576 || value=4194304
    fi
    # podman lowers its own RLIMIT_NPROC (and so conmon's and runc's) to 32768,
    # kernel.pid_max here, under the shell's 96365; root here lacks
    # CAP_SYS_RESOURCE, so a container asking for more fails with "error setting
    # rlimit type 6". 32768 processes are plenty for the router and its workers.
    if [ "$1" = u ]; then
        local cap
        cap=$(cat /proc/sys/kernel/pid_max)
        ((cap <= 32768)) || cap=32768
        ((value <= cap)) || value=$cap
    fi
    printf '%s' "$value"
}

write_config() {
    mkdir -p "$STATE/storage" "$STATE/networks" "$RUNDIR"
    local nofile nproc
    nofile=$(limit n)
    nproc=$(limit u)
    # CONTAINERS_CONF replaces every other containers.conf: all that matters is here.
    cat >"$CONTAINERS_CONF.tmp" <<EOF
# Written by deploy/compose.sh; do not edit (rewritten on every run).
[containers]
# podman's defaults (nofile 1048576) are above this machine's hard limits, which a
# container may not raise (root here lacks CAP_SYS_RESOURCE): stay at or below them.
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
init_path = "/usr/bin/catatonit"

[engine]
# crun fails on this machine's hybrid (v1 + unified) cgroup layout; runc works.
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "$RUNDIR/libpod"
helper_binaries_dir = ["/usr/lib/podman", "/usr/libexec/podman", "/usr/local/libexec/podman", "/usr/local/lib/podman"]

[network]
network_backend = "netavark"
network_config_dir = "$STATE/networks"
EOF
    cat >"$CONTAINERS_STORAGE_CONF.tmp" <<EOF
# Written by deploy/compose.sh; do not edit (rewritten on every run).
[storage]
driver = "overlay"
graphroot = "$STATE/storage"
runroot = "$RUNDIR/storage"
EOF
    cat >"$CONTAINERS_REGISTRIES_CONF.tmp" <<EOF
# Written by deploy/compose.sh; do not edit (rewritten on every run).
# Only local images are used here; short names that must be pulled (the
# official images in docker-compose.yml) would come from Docker Hub.
unqualified-search-registries = ["docker.io"]
short-name-mode = "permissive"
EOF
    local f
    for f in "$CONTAINERS_CONF" "$CONTAINERS_STORAGE_CONF" "$CONTAINERS_REGISTRIES_CONF"; do
        mv "$f.tmp" "$f"
    done
    podman info --format '{{.Host.OCIRuntime.Name}} {{.Host.CgroupManager}} {{.Store.GraphRoot}}' >"$STATE/podman-info.txt" 2>"$STATE/podman-info.err" ||
        { cat "$STATE/podman-info.err" >&2; die "podman does not start with $CONTAINERS_CONF"; }
}

# ---------------------------------------------------------------------------
# 4: the base image
# ---------------------------------------------------------------------------

debian_mirrors() {  # prints "MIRROR SECURITY_MIRROR" from the machine's apt sources
    python3 - <<'EOF'
import glob, re
main = security = None
def take(uris, suites):
    global main, security
    for uri in uris:
        if "debian" not in uri:
            continue
        for suite in suites:
            if suite.endswith("-security"):
                security = security or uri
            elif "-" not in suite:
                main = main or uri
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for block in re.split(r"\n\s*\n", open(path).read()):
        fields = dict(re.findall(r"^([A-Za-z-]+):[ \t]*(.*)$", block, re.M))
        if "deb" in fields.get("Types", "").split():
            take(fields.get("URIs", "").split(), fields.get("Suites", "").split())
for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
    try:
        lines = open(path).read().splitlines()
    except OSError:
        continue
    for line in lines:
        words = re.sub(r"\[[^]]*\]", "", line.split("#")[0]).split()
        if len(words) >= 3 and words[0] == "deb":
            take([words[1]], [words[2]])
main = (main or "http://deb.debian.org/debian").rstrip("/")
print(main, (security or main + "-security").rstrip("/"))
EOF
}

ensure_base() {
    if podman image exists "$BASE"; then
        log "base image $BASE: cached"
        return
    fi
    local mirror security root
    read -r mirror security < <(debian_mirrors)
    root=$STATE/rootfs
    umount_under "$root"
    rm -rf "$root"
    log "debootstrap --variant=minbase $SUITE from $mirror"
    debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$root" "$mirror" >"$STATE/debootstrap.log" 2>&1 ||
        { tail -20 "$STATE/debootstrap.log" >&2; umount_under "$root"; die "debootstrap failed (log: $STATE/debootstrap.log)"; }
    cat >"$root/etc/apt/sources.list" <<EOF
deb $mirror $SUITE main
deb $mirror $SUITE-updates main
deb $security $SUITE-security main
EOF
    # The proxy's CA (and any other the machine added), or TLS from inside fails.
    if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    fi
    chroot "$root" update-ca-certificates >>"$STATE/debootstrap.log" 2>&1
    chroot "$root" apt-get clean
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/*.log "$root"/var/log/apt/*
    umount_under "$root"
    tar --numeric-owner --xattrs -C "$root" -c . |
        podman import \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'ENV LANG=C.UTF-8' \
            --change 'CMD ["/bin/bash"]' \
            - "$BASE" >/dev/null
    rm -rf "$root"
    log "base image $BASE: $(podman image inspect --format '{{.Size}}' "$BASE" | numfmt --to=iec) ($SUITE minbase)"
}

umount_under() {  # unmount whatever debootstrap or a failed run left mounted under $1
    local dir=$1 m
    [ -d "$dir" ] || return 0
    for m in $(findmnt -rn -o TARGET | grep -F "$dir/" | sort -r); do
        umount -l "$m" || true
    done
}

# ---------------------------------------------------------------------------
# 5-6: images and the stack
# ---------------------------------------------------------------------------

build() {  # build TAG [podman build args...]
    local tag=$1
    shift
    log "building $tag"
    podman build --pull=never --layers --format docker --network host \
        --ulimit "nofile=$(limit n):$(limit n)" --ulimit "nproc=$(limit u):$(limit u)" \
        --build-arg "BASE_IMAGE=$BASE" -t "$tag" "$@" >"$STATE/build-${tag##*/}.log" 2>&1 ||
        { tail -30 "$STATE/build-${tag##*/}.log" >&2; die "building $tag failed (log: $STATE/build-${tag##*/}.log)"; }
}

build_images() {
    build "$ROUTER_IMAGE" --target router -f Dockerfile .
    build "$LOCUST_IMAGE" --target locust -f Dockerfile .
    build "$PROMETHEUS_IMAGE" -f deploy/offline/prometheus.Dockerfile deploy/offline
    podman image prune -f >/dev/null  # the previous builds' untagged images
}

compose() {
    "$VENV/bin/podman-compose" --in-pod=false -p "$PROJECT" "${COMPOSE_FILES[@]}" "$@"
}

check_mounts() {
    local f
    for f in deploy/prometheus/prometheus.yml deploy/prometheus/alerts.yml configs/compose.yaml; do
        [ -f "$f" ] || die "$f is missing (docker-compose.yml mounts it)"
    done
}

stack_up() {  # stack_up fresh|keep: fresh starts from nothing (down -v first)
    check_mounts
    [ "$1" = keep ] || down quiet
    [ -n "$(podman ps -q --filter "label=com.docker.compose.project=$PROJECT")" ] || check_ports
    log "starting the stack (model-init first: the demo model is built into the models volume)"
    compose up -d --no-build >"$STATE/compose-up.log" 2>&1 ||
        { tail -30 "$STATE/compose-up.log" >&2; die "podman-compose up failed (log: $STATE/compose-up.log)"; }
    [ "$(podman inspect --format '{{.State.ExitCode}}' "$(container model-init)")" = 0 ] ||
        { podman logs "$(container model-init)" 2>&1 | tail -20 >&2; die "model-init failed"; }
}

check_ports() {  # the published ports must be free (a `make run` router holds 8500 and 8501)
    local port
    for port in 8500 8501 8089 9090; do
        ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null ||
            die "port $port is in use on this machine (a router from \`make run\`?): the stack publishes it"
    done
}

container() {  # the container of service $1
    podman ps -a --filter "label=com.docker.compose.project=$PROJECT" \
        --filter "label=com.docker.compose.service=$1" --format '{{.Names}}' | head -1
}

http() {  # http URL [TIMEOUT_S]: waits until URL answers 200, prints its body
    python3 - "$@" <<'EOF'
import sys, time, urllib.request
url, timeout = sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 0
deadline, last = time.monotonic() + timeout, None
while True:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            sys.stdout.write(resp.read().decode())
            sys.exit(0)
    except Exception as exc:  # refused, 503, reset while the port forward comes up
        last = exc
    if time.monotonic() >= deadline:
        sys.exit(f"{url}: {last}")
    time.sleep(1)
EOF
}

wait_ready() {
    log "waiting for http://127.0.0.1:8501/readyz (the workers load and warm the model)"
    http http://127.0.0.1:8501/readyz 300 >/dev/null ||
        { podman logs --tail 40 "$(container router)" >&2; die "the router did not get ready"; }
}

check_healthcheck() {  # the image's HEALTHCHECK, run by hand (podman schedules it with systemd timers, absent here)
    local out
    out=$(podman healthcheck run "$(container router)" 2>&1) ||
        die "the router image's HEALTHCHECK fails although /readyz answers 200: $out"
    log "router HEALTHCHECK (python + urllib on /readyz): ${out:-healthy}"
}

down() {
    [ -x "$VENV/bin/podman-compose" ] && command -v podman >/dev/null || return 0
    [ -f "$CONTAINERS_CONF" ] || return 0
    local ids
    compose --profile grafana down -v -t 20 >"$STATE/compose-down.log" 2>&1 || true
    # Whatever an interrupted run left, by the project's labels (--depend: podman
    # knows compose's depends_on as --requires and removes dependents first).
    ids=$(podman ps -aq --filter "label=com.docker.compose.project=$PROJECT")
    [ -z "$ids" ] || podman rm -f -v --depend -t 20 $ids >/dev/null 2>&1 || true
    ids=$(podman volume ls -q --filter "label=com.docker.compose.project=$PROJECT")
    [ -z "$ids" ] || podman volume rm -f $ids >/dev/null
    podman network exists "${PROJECT}_default" && podman network rm -f "${PROJECT}_default" >/dev/null || true
    [ "${1:-}" = quiet ] || log "stack down: containers, network and volumes of $PROJECT removed"
}

check_gone() {  # nothing of the stack may survive `down`
    local left
    left=$(podman ps -aq --filter "label=com.docker.compose.project=$PROJECT"; podman volume ls -q
        podman network ls -q --filter "name=^${PROJECT}_")
    [ -z "$left" ] || die "left after down: $(echo $left)"
}

setup() {
    ensure_packages
    ensure_podman_compose
    write_config
    phase "tools and config"
    ensure_base
    phase "base image"
    build_images
    phase "images"
}

# ---------------------------------------------------------------------------
# compose-test's checks
# ---------------------------------------------------------------------------

locust_ui() {  # what a person does: "Start" in locust's web UI, then watch the graphs
    http http://127.0.0.1:8089/ 60 >/dev/null || die "locust's web UI (published :8089) does not answer"
    log "locust web UI: Start (POST /swarm, the form's defaults), until Prometheus shows the traffic"
    python3 - <<'PYEOF' || die "no traffic in Prometheus within a minute of Start in locust's web UI"
import json, sys, time, urllib.parse, urllib.request

def get(url, data=None):
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    with urllib.request.urlopen(url, data=body, timeout=5) as resp:
        return json.load(resp)

start = time.monotonic()
answer = get("http://127.0.0.1:8089/swarm", {"user_count": 16, "spawn_rate": 4})
if not answer.get("success"):
    sys.exit(f"locust /swarm: {answer}")
try:
    rate = 0.0
    while time.monotonic() - start < 60:
        time.sleep(2)
        result = get("http://127.0.0.1:9090/api/v1/query?" + urllib.parse.urlencode(
            {"query": "sum(rate(tfs_router_requests_total[15s]))"}))["data"]["result"]
        rate = float(result[0]["value"][1]) if result else 0.0
        if rate > 0:
            break
    stats = get("http://127.0.0.1:8089/stats/requests")
finally:
    get("http://127.0.0.1:8089/stop", {})
total = next((s for s in stats["stats"] if s["name"] == "Aggregated"), {})
print(f"locust UI: host {answer.get('host')}, {total.get('num_requests')} requests, "
      f"{total.get('num_failures')} failures; Prometheus saw {rate:.0f} req/s "
      f"{time.monotonic() - start:.0f} s after Start", file=sys.stderr)
sys.exit(None if rate > 0 and not total.get("num_failures") else "no traffic seen, or failures")
PYEOF
}

run_locust() {
    local name out
    name=$(container locust)
    [ -n "$name" ] || die "no locust container"
    log "locust headless, inside the locust container: $LOCUST_USERS users for $LOCUST_TIME against http://router:8501 (REST) and router:8500 (gRPC)"
    out=$STATE/locust
    rm -rf "$out" && mkdir -p "$out"
    podman exec "$name" locust -f /mnt/locust/locustfile.py --headless -u "$LOCUST_USERS" -r "$LOCUST_USERS" \
        -t "$LOCUST_TIME" --host http://router:8501 --only-summary --csv /tmp/compose-test \
        >"$out/locust.log" 2>&1 || { tail -40 "$out/locust.log" >&2; die "locust failed (a failed request, or locust itself: see above)"; }
    podman exec "$name" cat /tmp/compose-test_stats.csv >"$out/stats.csv"
    python3 - "$out/stats.csv" <<'EOF'
import csv, sys
rows = {r["Name"]: r for r in csv.DictReader(open(sys.argv[1], newline=""))}
bad = []
for name in ("REST predict", "gRPC Predict"):
    row = rows.get(name)
    if row is None or int(row["Request Count"]) == 0:
        bad.append(f"{name}: no requests")
    elif int(row["Failure Count"]):
        bad.append(f"{name}: {row['Failure Count']} failures")
total = rows["Aggregated"]
print(f"locust: {total['Request Count']} requests, {total['Failure Count']} failures, "
      f"{float(total['Requests/s']):.0f} req/s, p50 {total['50%']} ms, p99 {total['99%']} ms", file=sys.stderr)
for name in ("REST predict", "gRPC Predict"):
    r = rows.get(name, {})
    print(f"  {name}: {r.get('Request Count')} requests, {r.get('Failure Count')} failures, p99 {r.get('99%')} ms", file=sys.stderr)
sys.exit("; ".join(bad) or None)
EOF
}

check_prometheus() {
    http http://127.0.0.1:9090/-/ready 60 >/dev/null || die "Prometheus (published :9090) is not ready"
    python3 - <<'EOF' || { podman logs --tail 30 "$(container prometheus)" >&2; die "Prometheus checks failed"; }
import json, sys, time, urllib.parse, urllib.request

def query(q):
    url = "http://127.0.0.1:9090/api/v1/query?" + urllib.parse.urlencode({"query": q})
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.load(resp)["data"]["result"]

deadline = time.monotonic() + 60
while True:
    up = [s for s in query("up") if s["metric"].get("instance", "").startswith("router:")]
    requests = query("sum(tfs_router_requests_total)")
    total = float(requests[0]["value"][1]) if requests else 0.0
    if up and all(s["value"][1] == "1" for s in up) and total > 0:
        break
    if time.monotonic() > deadline:
        sys.exit(f"router targets: {up}; sum(tfs_router_requests_total) = {total}")
    time.sleep(2)
with urllib.request.urlopen("http://127.0.0.1:9090/api/v1/rules", timeout=5) as resp:
    groups = json.load(resp)["data"]["groups"]
rules = [r for g in groups for r in g["rules"]]
broken = [r["name"] for r in rules if r.get("health") == "err"]
jobs = sorted({s["metric"]["job"] for s in up})
print(f"prometheus: router target up (job {', '.join(jobs)}), sum(tfs_router_requests_total) = {total:.0f}, "
      f"{len(rules)} rules in {len(groups)} groups loaded", file=sys.stderr)
sys.exit(f"rules failing to evaluate: {broken}" if broken else None)
EOF
}

dump_logs() {
    local svc name
    for svc in model-init router prometheus locust; do
        name=$(container "$svc")
        [ -n "$name" ] || continue
        log "--- last lines of $svc ($name)"
        podman logs --tail 25 "$name" 2>&1 | sed 's/^/    /' >&2 || true
    done
}

image_sizes() {
    podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' |
        grep -E 'tfs-router' | sed 's/^/  /' >&2 || true
}

# ---------------------------------------------------------------------------

cmd=${1:-}
case "$cmd" in
up)
    setup
    stack_up keep
    wait_ready
    phase "stack up and ready"
    cat >&2 <<EOF

tfs-router compose stack ($PROJECT, offline: Prometheus from Debian, no Grafana) is up:
  gRPC        localhost:8500
  REST        http://localhost:8501/v1/models/ctr
  locust      http://localhost:8089   ("Start" sends load to the router)
  prometheus  http://localhost:9090
  admin       podman exec $(container router) tfs-router status
  stop        make compose-down  (deploy/compose.sh down)
EOF
    timings >&2
    ;;
test)
    state="warm"
    command -v podman >/dev/null && podman image exists "$BASE" 2>/dev/null || state="cold"
    # Each check that passed counts; the last line is "compose-test: N passed, M failed".
    passed=0
    # shellcheck disable=SC2154  # rc is set inside the trap
    trap 'rc=$?; if [ $rc != 0 ]; then dump_logs; fi; down; [ $rc = 0 ] || echo "compose-test: $passed passed, 1 failed"; exit $rc' EXIT
    setup
    stack_up fresh
    passed=$((passed + 1))  # the stack comes up, model-init succeeded
    wait_ready
    passed=$((passed + 1))  # /readyz through the published port
    check_healthcheck
    passed=$((passed + 1))  # the image's HEALTHCHECK
    phase "stack up and ready"
    locust_ui
    passed=$((passed + 1))  # locust UI Start -> traffic in Prometheus
    phase "locust UI start -> Prometheus"
    run_locust
    passed=$((passed + 1))  # 30 s headless locust, no failure
    phase "locust"
    check_prometheus
    passed=$((passed + 1))  # router up in Prometheus with requests
    phase "prometheus checks"
    down
    check_gone
    passed=$((passed + 1))  # nothing left after down
    trap - EXIT
    phase "down"
    log "images (kept as cache):"
    image_sizes
    timings >&2
    log "compose-test passed ($state start: $((SECONDS - STARTED)) s)"
    echo "compose-test: $passed passed, 0 failed"
    ;;
down)
    down
    ;;
clean)
    down
    if command -v podman >/dev/null && [ -f "$CONTAINERS_CONF" ]; then
        podman rmi -a -f >/dev/null 2>&1 || true
        podman system reset -f >/dev/null 2>&1 || true
    fi
    umount_under "$STATE"
    rm -rf "$STATE" "$RUNDIR"
    rmdir "$(dirname "$RUNDIR")" 2>/dev/null || true
    log "removed $STATE and $RUNDIR"
    ;;
*)
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
