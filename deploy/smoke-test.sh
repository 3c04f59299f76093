#!/usr/bin/env bash
# Run the image as a restricted pod would (read-only root, no capabilities, no privilege
# escalation, non-root user, writable /tmp only), classify a photo, then stop it with SIGTERM.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/catdog-serve:dev}
PORT=${PORT:-18000}
PHOTO=${PHOTO:-$(ls ../shared/data/catdog-web/cat/*.jpg 2>/dev/null | head -1)}
NAME=catdog-smoke-$$
export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}

[ -n "$PHOTO" ] || { echo "set PHOTO=path/to/a/photo.jpg" >&2; exit 2; }
cleanup() { podman rm -f "$NAME" >/dev/null 2>&1 || true; }
trap cleanup EXIT

podman run -d --name "$NAME" --network host --read-only --tmpfs /tmp:rw,size=256m \
  --cap-drop ALL --security-opt no-new-privileges --user 10001:10001 \
  -e CATDOG_INTRA_OP_THREADS=2 "$IMAGE" --host 127.0.0.1 --port "$PORT" >/dev/null

for _ in $(seq 1 180); do
  curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break
  sleep 1
done
echo "== readyz: $(curl -fsS "http://127.0.0.1:$PORT/readyz")"
echo "== user in the container: $(podman exec "$NAME" id)"
for model in xception mobilenet cascade; do
  echo "== classify $(basename "$PHOTO") with model=$model"
  curl -fsS -F "file=@$PHOTO" "http://127.0.0.1:$PORT/classify?model=$model"
  echo
done
echo "== write to the root filesystem is refused:"
podman exec "$NAME" sh -c 'touch /opt/venv/x' 2>&1 | tail -1 || true
podman stop --time 30 "$NAME" >/dev/null
echo "== exit status after SIGTERM: $(podman inspect "$NAME" --format '{{.State.ExitCode}}')"
podman logs "$NAME" 2>&1 | tail -3
