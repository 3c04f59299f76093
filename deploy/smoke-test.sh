#!/usr/bin/env bash
# Run the image as a restricted pod would (read-only root, no capabilities, no privilege
# escalation, non-root user, writable /tmp only, its own network namespace), classify a photo,
# then stop it with SIGTERM. Exits non-zero if any step fails.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/catdog-serve:dev}
PORT=${PORT:-18000}
shopt -s nullglob
photos=(../shared/data/catdog-web/cat/*.jpg)
PHOTO=${PHOTO:-${photos[0]:-}}
NAME=catdog-smoke-$$
# Settings for the container, KEY=VALUE separated by spaces: for the openvino image,
# SMOKE_ENV="CATDOG_PROVIDERS=openvino CATDOG_OPENVINO_PRECISION=bf16".
env_args=()
for setting in ${SMOKE_ENV:-}; do env_args+=(-e "$setting"); done
export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}

[ -f "$PHOTO" ] || { echo "set PHOTO=path/to/a/photo.jpg" >&2; exit 2; }
cleanup() { podman rm -f "$NAME" >/dev/null 2>&1 || true; }
trap cleanup EXIT

# The image's HEALTHCHECK is run once by hand below: podman's own timers need systemd, which this
# kind of build machine may lack (podman then logs "unable to get systemd connection"; harmless).
# rlimits are pinned because podman's defaults (host maximum) may exceed what an unprivileged or
# nested runtime may set; a pod gets its runtime's defaults instead.
podman run -d --name "$NAME" -p "127.0.0.1:$PORT:8000" --read-only --tmpfs /tmp:rw,size=256m \
  --cap-drop ALL --security-opt no-new-privileges --user 10001:10001 --ulimit nofile=4096:4096 --ulimit nproc=4096:4096 \
  -e CATDOG_INTRA_OP_THREADS=2 "${env_args[@]}" "$IMAGE" >/dev/null

for _ in $(seq 1 180); do
  curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break
  sleep 1
done
echo "== readyz: $(curl -fsS "http://127.0.0.1:$PORT/readyz")"
podman healthcheck run "$NAME" && echo "== image HEALTHCHECK: healthy"
echo "== user in the container: $(podman exec "$NAME" id)"
echo "== each model's provider and compute precision:"
curl -fsS "http://127.0.0.1:$PORT/models" | python3 -c 'import json, sys
for m in json.load(sys.stdin)["models"]: print(m["name"], m["provider"], m["compute_precision"])'
for model in xception mobilenet cascade; do
  echo "== classify $(basename "$PHOTO") with model=$model"
  curl -fsS -F "file=@$PHOTO" "http://127.0.0.1:$PORT/classify?model=$model"
  echo
done
echo "== write to the root filesystem is refused:"
podman exec "$NAME" sh -c 'touch /opt/venv/x' 2>&1 | tail -1 || true
podman stop --time 30 "$NAME" >/dev/null
status=$(podman inspect "$NAME" --format '{{.State.ExitCode}}')
echo "== exit status after SIGTERM: $status"
podman logs "$NAME" 2>&1 | tail -3
[ "$status" = 0 ]
