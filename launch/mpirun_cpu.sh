#!/usr/bin/env bash
# Start lars-train (or any program) on CPU nodes with mpirun: ranks per node or per socket,
# each rank bound to its own cores, TensorFlow and OpenMP threads sized to those cores, every
# Horovod/TF setting exported to every rank with -x.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

HOST_ARGS="" HOSTFILE="" RPN="" RPS="" CORES="" SOCKETS="" INTER="" NIC="" MPIRUN=mpirun
LAUNCHER_OPTIONS=(
    "## Hosts and placement:"
    "-H|--hosts HOST_ARGS value # LIST # host[:slots],... (default: localhost)"
    "--hostfile HOSTFILE value # FILE # lines \"host slots=N\" or \"host:N\" (or just \"host\")"
    "--ranks-per-node RPN uint # N # N ranks on every node, each bound to cores/N cores"
    "--ranks-per-socket RPS uint # N # N ranks on every socket (default: 1 per socket)"
    "--cores-per-node CORES uint # N # physical cores per node (default: this node's)"
    "--sockets-per-node SOCKETS uint # N # sockets per node (default: this node's)"
    "--inter-op-threads INTER uint # N # TensorFlow inter-op threads per rank (default: lars-train's, 2; 1 with --deterministic)"
    "--network-interface NIC value # NIC # the interface between nodes (MPI's TCP transport)"
    "--mpirun MPIRUN value # PATH # the mpirun to use (default: mpirun on PATH: the venv's Open MPI, or a system Open MPI / MPICH / Intel MPI)"
)

usage() {
    cat <<EOF
Usage: $(basename "$0") [options] [-- [lars-train flags | program args...]]

Nodes are assumed alike: cores and sockets are read from this node (lscpu) unless given.
After "--" come lars-train's flags, or a program of your own (e.g. python train.py).

$(options_help "${LAUNCHER_OPTIONS[@]}")

$(options_help "${TUNING_OPTIONS[@]}")

A job on several hosts that fails is followed by an ssh check (5 s) that names the hosts
no longer answering (a host lost without a word shows only as a timeout on the others).

Examples:
  $(basename "$0") --hostfile hosts.txt --ranks-per-socket 1 -- --model=alexnet_bn \\
      --dataset=imagenet --data_dir=/data/imagenet --global_batch_size=8192 ...
  $(basename "$0") --ranks-per-node 2 --dry-run -- --model=small_cnn
EOF
}

parse_args "$@"
apply_settings

[[ -n "$RPN" && -n "$RPS" ]] && die "give --ranks-per-node or --ranks-per-socket, not both"
command -v "$MPIRUN" >/dev/null 2>&1 || die "--mpirun=$MPIRUN: not found (activate the venv, or give the path of your MPI's mpirun)"

lscpu_field() { LC_ALL=C lscpu 2>/dev/null | sed -n "s/^$1:[[:space:]]*//p" | head -1; }
if [[ -z "$SOCKETS" ]]; then SOCKETS="$(lscpu_field 'Socket(s)')"; SOCKETS="${SOCKETS:-1}"; fi
if [[ -z "$CORES" ]]; then
    per_socket="$(lscpu_field 'Core(s) per socket')"
    CORES=$(( ${per_socket:-$(nproc)} * SOCKETS ))
fi
(( SOCKETS >= 1 )) || die "--sockets-per-node=$SOCKETS: must be >= 1"
(( CORES >= SOCKETS )) || die "--cores-per-node=$CORES: fewer cores than the $SOCKETS sockets"

if [[ -n "$RPN" ]]; then
    (( RPN >= 1 )) || die "--ranks-per-node=$RPN: must be >= 1"
    PER_NODE="$RPN" UNIT=node
    PE=$(( CORES / RPN ))
    (( PE >= 1 )) || die "--ranks-per-node=$RPN: more ranks than the $CORES cores of a node"
else
    RPS="${RPS:-1}"
    (( RPS >= 1 )) || die "--ranks-per-socket=$RPS: must be >= 1"
    PER_NODE=$(( RPS * SOCKETS )) UNIT=socket
    PE=$(( CORES / SOCKETS / RPS ))
    (( PE >= 1 )) || die "--ranks-per-socket=$RPS: more ranks than the $(( CORES / SOCKETS )) cores of a socket"
fi

HOSTS="$(read_hosts "$HOST_ARGS" "$HOSTFILE")"
IFS=',' read -r -a entries <<< "$HOSTS"
for entry in "${entries[@]}"; do
    slots="${entry#*:}"
    if [[ "$slots" != 0 ]] && (( slots < PER_NODE )); then
        die "${entry%%:*} offers $slots slots, fewer than the $PER_NODE ranks per node asked for"
    fi
done
HOSTS="$(set_slots "$HOSTS" "$PER_NODE")"
NP="$(total_slots "$HOSTS")"

setvar OMP_NUM_THREADS "$PE"
if is_lars_train; then
    PROGRAM+=(--intra_op_threads="$PE")
    # unset, lars-train picks (2; 1 with --deterministic, whose runs repeat only then)
    [[ -n "$INTER" ]] && PROGRAM+=(--inter_op_threads="$INTER")
fi

VERSION="$("$MPIRUN" --version 2>&1 | head -3 || true)"
EXPORTS=("${LT_VARS[@]}" PATH)
[[ -n "${PYTHONPATH:-}" ]] && EXPORTS+=(PYTHONPATH)
[[ -n "${LD_LIBRARY_PATH:-}" ]] && EXPORTS+=(LD_LIBRARY_PATH)
if [[ "$VERSION" == *"Open MPI"* ]]; then
    major="$(sed -n 's/.*Open MPI) \([0-9]*\).*/\1/p' <<< "$VERSION" | head -1)"
    socket=package
    [[ "${major:-5}" -lt 5 ]] && socket=socket
    if [[ "$UNIT" == node ]]; then map="ppr:$PER_NODE:node:PE=$PE"; else map="ppr:$RPS:$socket:PE=$PE"; fi
    # Horovod's background thread runs an MPI collective every cycle (HOROVOD_CYCLE_TIME), and
    # Open MPI busy-polls while it waits, taking the core from the rank's own compute: on 2
    # cores, 2 ranks x 1 thread trained ResNet-50 at 3.48 images/s with it, 5.02 with Open MPI
    # yielding when idle, 5.08 without Horovod (benchmarks/RESULTS.md, "Scaling").
    CMD=("$MPIRUN" -np "$NP" -H "$HOSTS" --map-by "$map" --bind-to core
         --mca mpi_yield_when_idle 1)
    for v in "${EXPORTS[@]}"; do CMD+=(-x "$v"); done
    [[ -n "$NIC" ]] && CMD+=(--mca btl_tcp_if_include "$NIC" --mca oob_tcp_if_include "$NIC")
    [[ "$(id -u)" == 0 ]] && CMD+=(--allow-run-as-root)
elif [[ "$VERSION" == *HYDRA* || "$VERSION" == *"Intel(R) MPI"* ]]; then
    # MPICH and Intel MPI (both use the Hydra process manager)
    hosts="$(host_names "$HOSTS")"
    vars="$(IFS=,; printf '%s' "${EXPORTS[*]}")"
    CMD=("$MPIRUN" -n "$NP" -ppn "$PER_NODE" -hosts "$hosts" -bind-to "core:$PE"
         -genvlist "$vars")
    [[ "$UNIT" == socket ]] && CMD+=(-map-by socket)
    [[ -n "$NIC" ]] && CMD+=(-iface "$NIC")
else
    die "--mpirun=$MPIRUN: cannot tell which MPI this is (want Open MPI, MPICH or Intel MPI); its --version says: ${VERSION:-nothing}"
fi
REMOTE_HOSTS="$(remote_hosts "$HOSTS")"
show_and_run "${CMD[@]}" "${PROGRAM[@]}"
