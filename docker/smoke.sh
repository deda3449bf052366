#!/usr/bin/env bash
# The image and the compose stack, for real, under podman and without any registry: bootstrap a Debian base
# image, build the app image on it, run it alone, then bring up the stack (app, proxy, Prometheus) with
# podman-compose, send traffic through the proxy, check what Prometheus saw, and scale the app to 2 replicas.
#
#   sudo make smoke      (or sudo docker/smoke.sh; needs root, podman, runc, iptables, debootstrap and
#                         podman-compose; takes minutes; not part of `make test`)
#
# nginx and Prometheus run from stand-in images built here from Debian's packages, tagged with the compose
# file's image names (nginx:1.27-alpine, prom/prometheus:v2.53.0) in local storage only; the compose file
# keeps the official images. Grafana is skipped: no registry reachable here has it.
#
# Environment: MIRROR (Debian mirror, default: the one apt uses), TORCH_WHEEL_DIR (a folder holding the CPU
# torch wheel, default /opt/wheels), WORK (scratch folder, default /tmp/ddsnet-smoke), PORT (18000, the lone
# container), RUNTIME (runc's path).
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${WORK:-/tmp/ddsnet-smoke}
PORT=${PORT:-18000}
PROJECT=ddsnet-smoke
TORCH_WHEEL_DIR=${TORCH_WHEEL_DIR:-/opt/wheels}
RUNTIME=${RUNTIME:-$(command -v runc || echo /usr/sbin/runc)}
MIRROR=${MIRROR:-$( (grep -rhoE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null || true) | head -n 1 | tr -d ' ')}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

# runc cannot raise a limit above what it inherits: nofile at most the hard limit (and 1048576), nproc at
# most kernel.pid_max (podman's own default is nproc=pid_max).
NOFILE=$(ulimit -Hn); [ "$NOFILE" = unlimited ] || [ "$NOFILE" -gt 1048576 ] && NOFILE=1048576
NPROC=$(cat /proc/sys/kernel/pid_max)
PODMAN=(podman --runtime "$RUNTIME")
ULIMITS=(--ulimit "nofile=$NOFILE:$NOFILE" --ulimit "nproc=$NPROC:$NPROC")
# podman-compose passes no flags of ours to podman: the runtime and the limits go in a containers.conf.
mkdir -p "$WORK"
cat > "$WORK/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$NOFILE:$NOFILE", "nproc=$NPROC:$NPROC"]
[engine]
runtime = "runc"
[engine.runtimes]
runc = ["$RUNTIME"]
EOF
export CONTAINERS_CONF="$WORK/containers.conf"
COMPOSE=(podman-compose -p "$PROJECT" -f docker-compose.yml)

PASSED=()
step() { printf '\n== %s\n' "$*"; }
pass() { PASSED+=("$1"); echo "ok: $1"; }
ids() { podman ps -aq --filter "label=io.podman.compose.project=$PROJECT"; }
cleanup() {
  status=$?
  set +e  # tear everything down even where a step of the teardown fails
  if [ -s "$WORK/lone.id" ]; then
    [ $status -eq 0 ] || "${PODMAN[@]}" logs "$(cat "$WORK/lone.id")" 2>&1 | tail -n 20
    "${PODMAN[@]}" rm -f "$(cat "$WORK/lone.id")" >/dev/null 2>&1 || true
    rm -f "$WORK/lone.id"
  fi
  stack=$(ids || true)
  if [ -n "$stack" ]; then
    if [ $status -ne 0 ]; then
      for id in $stack; do "${PODMAN[@]}" logs "$id" 2>&1 | tail -n 5; done
    fi
    # Torn down by id: whatever this project started goes, and nothing else.
    # shellcheck disable=SC2086
    "${PODMAN[@]}" rm -f $stack >/dev/null 2>&1 || true
  fi
  podman network rm -f "${PROJECT}_default" >/dev/null 2>&1 || true
  [ $status -eq 0 ] || echo "smoke: FAILED after ${#PASSED[@]} checks passed: ${PASSED[*]:-none}" >&2
}
trap cleanup EXIT

# iptables: podman's network backend (netavark) sets up the compose network's rules with it.
for tool in podman podman-compose debootstrap iptables curl python3; do
  command -v "$tool" >/dev/null || { echo "error: $tool is not installed (podman-compose: pip install podman-compose)" >&2; exit 2; }
done
[ -x "$RUNTIME" ] || { echo "error: runc not found at $RUNTIME (apt-get install runc, or set RUNTIME)" >&2; exit 2; }
[ -f checkpoints/ddsnet-color.safetensors ] || { echo "error: checkpoints/ddsnet-color.safetensors missing" >&2; exit 2; }

wait_for() {  # wait_for SECONDS COMMAND...: retry COMMAND every second until it succeeds
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { echo "timed out waiting for: $*" >&2; return 1; }
    sleep 1
  done
}

step "1/8 debootstrap a Debian bookworm base ($MIRROR)"
if [ ! -x "$WORK/rootfs/usr/bin/python3" ]; then
  debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates bookworm \
    "$WORK/rootfs" "$MIRROR"
fi
# Make it look like the official python image to the Dockerfile: `python` on PATH and a pip that may
# install into the system interpreter; and let pip find the local CPU torch wheel.
ln -sf /usr/bin/python3 "$WORK/rootfs/usr/local/bin/python"
mkdir -p "$WORK/rootfs/wheels"
cp "$TORCH_WHEEL_DIR"/torch-*.whl "$WORK/rootfs/wheels/" 2>/dev/null || echo "(no local torch wheel; pip will download one)"
# Trust what this host trusts (a TLS-intercepting proxy's CA, where there is one), and use its Debian mirror.
cp /etc/ssl/certs/ca-certificates.crt "$WORK/rootfs/etc/ssl/certs/ca-certificates.crt"
printf '[global]\nbreak-system-packages = true\nfind-links = /wheels\ncert = /etc/ssl/certs/ca-certificates.crt\n' \
  > "$WORK/rootfs/etc/pip.conf"
echo "deb $MIRROR bookworm main" > "$WORK/rootfs/etc/apt/sources.list"
tar -C "$WORK/rootfs" -c . | "${PODMAN[@]}" import - localhost/ddsnet-base:bookworm >/dev/null
pass "base image"

step "2/8 build the app image"
"${PODMAN[@]}" build --format docker --network host -f docker/Dockerfile \
  --build-arg BASE_IMAGE=localhost/ddsnet-base:bookworm \
  --build-arg TORCH_INDEX_URL=https://pypi.org/simple \
  -t localhost/ddsnet:smoke -t localhost/ddsnet:latest .
pass "app image"

step "3/8 run it alone: /readyz and POST /denoise"
"${PODMAN[@]}" run -d --network host --no-healthcheck "${ULIMITS[@]}" \
  localhost/ddsnet:smoke ddsnet serve --host 127.0.0.1 --port "$PORT" > "$WORK/lone.id"
wait_for 180 curl -sf "http://127.0.0.1:$PORT/readyz"
# A noisy PNG made, and the answer checked, with the standard library only.
python3 - "$WORK/noisy.png" <<'PY'
import random, struct, sys, zlib
width, height = 128, 96
random.seed(0)
rows = b"".join(b"\0" + bytes(random.randrange(256) for _ in range(3 * width)) for _ in range(height))
chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
open(sys.argv[1], "wb").write(png + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
PY
png_size() { python3 -c "import struct, sys; d = open(sys.argv[1], 'rb').read(24); assert d[:8] == b'\x89PNG\r\n\x1a\n', 'not a PNG'; print('%dx%d' % struct.unpack('>II', d[16:24]))" "$1"; }
curl -sf -D - -o "$WORK/clean.png" -F "file=@$WORK/noisy.png" "http://127.0.0.1:$PORT/denoise?quality=auto" | grep -i '^ddsnet-'
[ "$(png_size "$WORK/clean.png")" = 128x96 ] || { echo "answer is $(png_size "$WORK/clean.png"), not 128x96" >&2; exit 1; }
"${PODMAN[@]}" rm -f "$(cat "$WORK/lone.id")" >/dev/null && rm -f "$WORK/lone.id"
pass "lone container"

step "4/8 stand-in nginx and Prometheus images from Debian's packages"
cat > "$WORK/Containerfile.nginx" <<'EOF'
FROM localhost/ddsnet-base:bookworm
RUN apt-get update && apt-get install -y --no-install-recommends nginx-light && rm -rf /var/lib/apt/lists/* \
    && ln -sf /dev/stdout /var/log/nginx/access.log && ln -sf /dev/stderr /var/log/nginx/error.log
CMD ["nginx", "-g", "daemon off;"]
EOF
cat > "$WORK/Containerfile.prometheus" <<'EOF'
FROM localhost/ddsnet-base:bookworm
RUN apt-get update && apt-get install -y --no-install-recommends prometheus && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /prometheus && chmod 777 /prometheus
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
EOF
"${PODMAN[@]}" build --format docker --network host -f "$WORK/Containerfile.nginx" -t nginx:1.27-alpine "$WORK"
"${PODMAN[@]}" build --format docker --network host -f "$WORK/Containerfile.prometheus" -t prom/prometheus:v2.53.0 "$WORK"
pass "stand-in images"

step "5/8 podman-compose up (grafana skipped: its image cannot be had from any registry reachable here)"
"${COMPOSE[@]}" up -d --no-build app proxy prometheus
wait_for 240 curl -sf http://127.0.0.1:8000/readyz
pass "stack up, /readyz through the proxy"

step "6/8 20 requests through the proxy"
for _ in $(seq 1 20); do
  code=$(curl -s -o "$WORK/answer.png" -w '%{http_code}' -F "file=@$WORK/noisy.png" "http://127.0.0.1:8000/denoise")
  [ "$code" = 200 ] || { echo "a request through the proxy got $code" >&2; exit 1; }
done
[ "$(png_size "$WORK/answer.png")" = 128x96 ]
pass "20/20 through the proxy"

step "7/8 Prometheus: the replica is up and counted every request"
query() { curl -sf --get http://127.0.0.1:9090/api/v1/query --data-urlencode "query=$1" \
  | python3 -c "import json, sys; r = json.load(sys.stdin)['data']['result']; print(r[0]['value'][1] if r else 'none')"; }
targets_up() { [ "$(query 'sum(up{job="ddsnet"})')" = "$1" ]; }
counted() { [ "$(query 'sum(ddsnet_requests_total{status="200"})')" = "$1" ]; }
wait_for 120 targets_up 1
wait_for 60 counted 20
pass "prometheus: 1 target up, ddsnet_requests_total = 20"

step "8/8 --scale app=2"
"${COMPOSE[@]}" up -d --no-build --scale app=2 app
wait_for 180 targets_up 2
pass "prometheus: 2 targets up after --scale app=2"

echo
summary=$(printf '%s; ' "${PASSED[@]}")
echo "smoke: passed ${#PASSED[@]}/8 checks: ${summary%; } (grafana skipped: no reachable registry has its image)"
