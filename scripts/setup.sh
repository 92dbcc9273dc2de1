#!/usr/bin/env bash
# Idempotent setup for hpctrain on Debian: Open MPI (apt), a virtualenv in .venv with the
# Python deps, and Horovod 0.28.1 built against the installed torch with the C++17 patch.
# The Horovod wheel is cached in $HPCTRAIN_CACHE so a second setup takes seconds.
#
# Environment knobs:
#   HPCTRAIN_VENV   where the virtualenv lives          (default: ./.venv)
#   HPCTRAIN_CACHE  where built wheels are cached       (default: ~/.cache/hpctrain)
#   TORCH_SPEC      the torch requirement               (default: torch==2.13.0, a CPU build)
#   HOROVOD_GPU_OPERATIONS  NCCL by default when TORCH_SPEC is a CUDA build (needs the CUDA toolkit);
#                           the wheel cache is keyed on it. The torch.distributed engine needs no build.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=$(realpath -m "${HPCTRAIN_VENV:-.venv}")
CACHE=$(realpath -m "${HPCTRAIN_CACHE:-$HOME/.cache/hpctrain}")
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
HOROVOD_VERSION=0.28.1
PY=${PYTHON:-python3}
say() { printf '[setup] %s\n' "$*"; }

# 1. Open MPI (mpirun + headers for mpi4py/Horovod).
if ! command -v mpirun >/dev/null || ! command -v mpicxx >/dev/null; then
  say "installing Open MPI (apt)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libopenmpi-dev openmpi-bin >/dev/null
fi

# 2. Virtualenv with torch first (Horovod's build needs it), then everything else.
if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
stamp="$VENV/.hpctrain-deps-$(cat setup.cfg scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  say "installing Python dependencies"
  $PIP install --upgrade pip setuptools wheel
  $PIP install "$TORCH_SPEC"
  $PIP install -e ".[test]"
  touch "$stamp"
fi

# 3. Horovod, from the cached wheel when there is one for this torch.
torch_tag=$("$VENV/bin/python" -c 'import torch; print(torch.__version__.replace("+", "_"))')
# A CUDA torch wants Horovod's GPU collectives (NCCL), else CUDA tensors are staged through the host.
gpu_ops=${HOROVOD_GPU_OPERATIONS:-$("$VENV/bin/python" -c 'import torch; print("NCCL" if torch.version.cuda else "")')}
wheel_dir="$CACHE/wheels/horovod-$HOROVOD_VERSION-torch$torch_tag${gpu_ops:+-gpu$gpu_ops}"
if ! "$VENV/bin/python" -c 'import horovod.torch' 2>/dev/null; then
  if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
    say "building Horovod $HOROVOD_VERSION against torch $torch_tag (once, ~5 min)"
    build=$(mktemp -d)
    trap 'rm -rf "$build"' EXIT
    $PIP download --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$build"
    tar -xzf "$build"/horovod-*.tar.gz -C "$build"
    src=$(echo "$build"/horovod-$HOROVOD_VERSION)
    # Horovod asks for C++14; torch >= 2.1 headers need C++17.
    sed -i 's/CMAKE_CXX_STANDARD 14/CMAKE_CXX_STANDARD 17/' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
    mkdir -p "$wheel_dir.tmp"
    if [ -n "$gpu_ops" ]; then export HOROVOD_GPU_OPERATIONS=$gpu_ops; fi
    (cd "$src" && HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
       HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS="-j$(nproc)" \
       "$VENV/bin/python" -m pip wheel --no-deps --no-build-isolation -q -w "$wheel_dir.tmp" .)
    rm -rf "$wheel_dir" && mv "$wheel_dir.tmp" "$wheel_dir"
  fi
  say "installing Horovod from $wheel_dir"
  $PIP install --no-deps "$wheel_dir"/horovod-*.whl cloudpickle psutil pyyaml packaging
fi
"$VENV/bin/python" - <<'PY'
import horovod, horovod.torch as hvd, torch
print(f"[setup] ready: torch {torch.__version__}, horovod {horovod.__version__}, "
      f"mpi={hvd.mpi_built()}, gloo={hvd.gloo_built()}, nccl={hvd.nccl_built()}")
PY
