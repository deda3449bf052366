#!/usr/bin/env bash
# Try the image for real with podman, without any registry: bootstrap a Debian base image locally,
# build docker/Dockerfile on it, run it with runc, and hit /readyz and POST /denoise.
#
#   sudo docker/smoke.sh            (needs root, podman, debootstrap, runc; takes minutes; not in CI)
#
# Environment: MIRROR (Debian mirror, default: the one apt uses), TORCH_WHEEL_DIR (a folder holding the
# CPU torch wheel, default /opt/wheels), WORK (scratch folder, default /tmp/ddsnet-smoke), PORT (18000).
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${WORK:-/tmp/ddsnet-smoke}
PORT=${PORT:-18000}
TORCH_WHEEL_DIR=${TORCH_WHEEL_DIR:-/opt/wheels}
MIRROR=${MIRROR:-$( (grep -rhoE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null || true) | head -n 1 | tr -d ' ')}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
PODMAN=(podman --runtime /usr/sbin/runc)
step() { printf '\n== %s\n' "$*"; }

for tool in podman debootstrap; do
  command -v "$tool" >/dev/null || { echo "error: $tool is not installed" >&2; exit 2; }
done
step "1/5 debootstrap a Debian bookworm base ($MIRROR)"
mkdir -p "$WORK"
if [ ! -x "$WORK/rootfs/usr/bin/python3" ]; then
  debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates bookworm \
    "$WORK/rootfs" "$MIRROR"
fi
# Make it look like the official python image to the Dockerfile: `python` on PATH and a pip that may
# install into the system interpreter; and let pip find the local CPU torch wheel.
ln -sf /usr/bin/python3 "$WORK/rootfs/usr/local/bin/python"
mkdir -p "$WORK/rootfs/wheels"
cp "$TORCH_WHEEL_DIR"/torch-*.whl "$WORK/rootfs/wheels/" 2>/dev/null || echo "(no local torch wheel; pip will download one)"
# Trust what this host trusts (a TLS-intercepting proxy's CA, where there is one).
cp /etc/ssl/certs/ca-certificates.crt "$WORK/rootfs/etc/ssl/certs/ca-certificates.crt"
printf '[global]\nbreak-system-packages = true\nfind-links = /wheels\ncert = /etc/ssl/certs/ca-certificates.crt\n' \
  > "$WORK/rootfs/etc/pip.conf"

step "2/5 podman import"
tar -C "$WORK/rootfs" -c . | "${PODMAN[@]}" import - localhost/ddsnet-base:bookworm

step "3/5 podman build"
[ -f checkpoints/ddsnet-color.safetensors ] || { echo "error: checkpoints/ddsnet-color.safetensors missing" >&2; exit 2; }
"${PODMAN[@]}" build --format docker --network host -f docker/Dockerfile \
  --build-arg BASE_IMAGE=localhost/ddsnet-base:bookworm \
  --build-arg TORCH_INDEX_URL=https://pypi.org/simple \
  -t localhost/ddsnet:smoke .

step "4/5 run"
"${PODMAN[@]}" rm -f ddsnet-smoke >/dev/null 2>&1 || true
"${PODMAN[@]}" run -d --name ddsnet-smoke --network host --no-healthcheck \
  --ulimit "nofile=$(ulimit -Sn):$(ulimit -Hn)" --ulimit "nproc=$(ulimit -Su):$(ulimit -Hu)" \
  localhost/ddsnet:smoke ddsnet serve --host 127.0.0.1 --port "$PORT"
trap '"${PODMAN[@]}" logs ddsnet-smoke | tail -n 20; "${PODMAN[@]}" rm -f ddsnet-smoke >/dev/null' EXIT
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break
  sleep 1
done
curl -sf "http://127.0.0.1:$PORT/readyz"
echo

step "5/5 POST /denoise"
python3 - "$WORK/noisy.png" <<'PY'
import sys, numpy as np
from PIL import Image
rng = np.random.default_rng(0)
Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(sys.argv[1])
PY
curl -sf -D - -o "$WORK/clean.png" -F "file=@$WORK/noisy.png" "http://127.0.0.1:$PORT/denoise?quality=auto" | grep -i '^ddsnet-'
python3 -c "from PIL import Image; im = Image.open('$WORK/clean.png'); assert im.size == (128, 96), im.size; print('ok:', im.size)"
echo "smoke test passed"
