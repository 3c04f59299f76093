#!/usr/bin/env bash
# Build the CPU image with buildah, without a Docker engine and without network access inside the
# build: the base is a Debian bookworm (Python 3.11) root filesystem made with debootstrap, the
# Python wheels are downloaded on the host into deploy/wheels and the pretrained weight sources
# into deploy/cache (hash-checked by `model_export fetch`), so the build runs with pip --no-index.
set -euo pipefail
cd "$(dirname "$0")/.."

# or gpu / openvino: the runtime image with onnxruntime-gpu (README, "GPU") / onnxruntime-openvino
TARGET=${TARGET:-runtime}
IMAGE=${IMAGE:-localhost/catdog-serve:dev$([ "$TARGET" != runtime ] && echo "-$TARGET")}
BASE=${BASE:-localhost/catdog-base:bookworm-py311}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
PY=${PY:-.venv/bin/python}
export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs} BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}

for tool in buildah podman debootstrap; do
  command -v "$tool" >/dev/null || { echo "needs $tool: apt-get install buildah podman debootstrap runc" >&2; exit 2; }
done
[ -x "$PY" ] || { echo "needs the project venv: make install" >&2; exit 2; }

if ! podman image exists "$BASE"; then
  echo "== base image $BASE from debootstrap ($MIRROR)"
  rootfs=$(mktemp -d)
  trap 'rm -rf "$rootfs"' EXIT
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$MIRROR"
  ln -sf python3 "$rootfs/usr/bin/python"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | podman import --change 'CMD ["python3"]' - "$BASE"
fi

echo "== wheelhouse deploy/wheels (runtime + export stack + build backend)"
"$PY" -m pip download --quiet --dest deploy/wheels '.[export]' 'setuptools>=77' wheel pip
if [ "$TARGET" != runtime ]; then
  "$PY" -m pip download --quiet --dest deploy/wheels -r "deploy/$TARGET-requirements.txt"
fi
echo "== pretrained weight sources into deploy/cache"
"$PY" -m model_export --cache-dir deploy/cache fetch

echo "== image $IMAGE"
buildah build --layers --format docker --build-arg "PYTHON_IMAGE=$BASE" --build-arg PIP_NO_INDEX=1 \
  --build-arg "GIT_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
  --target "$TARGET" -t "$IMAGE" .
podman image inspect "$IMAGE" --format 'built {{.Id}}: user {{.Config.User}}, entrypoint {{.Config.Entrypoint}}'
podman image inspect "$IMAGE" --format '{{.Size}}' | awk '{printf "size: %.0f MB\n", $1 / 1e6}'
