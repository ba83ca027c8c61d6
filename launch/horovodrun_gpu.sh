#!/usr/bin/env bash
# Start lars-train (or any program) on GPU nodes with horovodrun: one process per GPU, the
# Horovod tuning of a preset, every setting printed.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

HOST_ARGS="" HOSTFILE="" NP="" GPUS_PER_HOST="" NIC="" CONTROLLER=""
ELASTIC=0 DISCOVERY="" MIN_NP="" MAX_NP="" ELASTIC_TIMEOUT="" COOLDOWN=""
LAUNCHER_OPTIONS=(
    "## Hosts:"
    "-H|--hosts HOST_ARGS value # LIST # host:slots,... (slots default to --gpus-per-host)"
    "--hostfile HOSTFILE value # FILE # lines \"host slots=N\" or \"host:N\" (or just \"host\")"
    "--gpus-per-host GPUS_PER_HOST uint # N # processes per host without a slot count (default: GPUs that nvidia-smi lists here, else 1)"
    "-np NP value # N # total processes (default: every slot)"
    "--network-interface NIC value # NIC # the interface(s) between hosts (e.g. eth0 or ib0,eth0)"
    "--mpi CONTROLLER =--mpi # - # Horovod's MPI controller (the default when mpirun is on PATH, as with the venv's Open MPI; Horovod 0.28.1 enforces --stall-check-shutdown-time-seconds only under MPI)"
    "--gloo CONTROLLER =--gloo # - # Horovod's Gloo controller (the default without mpirun)"
    "## Elastic (Gloo; ranks may leave and join, the global batch and schedule stay as set):"
    "--elastic ELASTIC =1 # - # start an elastic job (passes --elastic to lars-train)"
    "--host-discovery-script DISCOVERY value # S # an executable that prints the hosts available now, one \"host\" or \"host:slots\" a line (run every second by horovodrun)"
    "--min-np MIN_NP uint # N # the fewest ranks the job goes on with (default: -np)"
    "--max-np MAX_NP uint # N # the most ranks it grows to (default: no limit)"
    "--elastic-timeout ELASTIC_TIMEOUT uint # S # how long a reset waits for --min-np ranks (default: 600)"
    "--blacklist-cooldown-range COOLDOWN value # \"MIN MAX\" # a failed host may come back after MIN..MAX seconds, doubling with each failure (default: a failed host never comes back)"
    "#. The ssh sessions to the hosts must end when a host vanishes (ServerAliveInterval in the"
    "#. ssh config): horovodrun counts a rank lost when its session ends."
)

usage() {
    cat <<EOF
Usage: $(basename "$0") [options] [-- [lars-train flags | program args...]]

One process per GPU on every host; each process uses the GPU of its local rank (lars_tf pins
it). After "--" come lars-train's flags, or a program of your own (e.g. python train.py).

$(options_help "${LAUNCHER_OPTIONS[@]}")

$(options_help "${TUNING_OPTIONS[@]}")

A job on several hosts that fails is followed by an ssh check (5 s) that names the hosts
no longer answering (a host lost without a word shows only as a timeout on the others).

Examples:
  $(basename "$0") -H node1:8,node2:8 --preset infiniband -- --model=resnet50 \\
      --dataset=imagenet --data_dir=/data/imagenet --global_batch_size=16384 ...
  $(basename "$0") -H localhost --gpus-per-host 4 --dry-run -- --model=resnet50
EOF
}

parse_args "$@"
apply_settings

if [[ -z "$GPUS_PER_HOST" ]]; then
    GPUS_PER_HOST=1
    if command -v nvidia-smi >/dev/null 2>&1; then
        n="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
        [[ "$n" -gt 0 ]] && GPUS_PER_HOST="$n"
    fi
fi
[[ "$GPUS_PER_HOST" -ge 1 ]] || die "--gpus-per-host=$GPUS_PER_HOST: must be >= 1"
if [[ "$ELASTIC" == 1 ]]; then
    [[ -n "$DISCOVERY" ]] || die "--elastic needs --host-discovery-script (the hosts of now)"
    [[ -z "$HOST_ARGS" && -z "$HOSTFILE" ]] \
        || die "--elastic: the hosts come from --host-discovery-script, not -H/--hostfile"
    [[ -f "$DISCOVERY" && -x "$DISCOVERY" ]] \
        || die "--host-discovery-script=$DISCOVERY: not an executable file"
    [[ "$CONTROLLER" != --mpi ]] || die "--elastic runs under Gloo (horovodrun has no elastic MPI)"
    CONTROLLER=--gloo
    [[ -n "$NP" || -n "$MIN_NP" ]] || die "--elastic needs -np or --min-np"
    NP="${NP:-$MIN_NP}" MIN_NP="${MIN_NP:-$NP}"
    (( 10#$MIN_NP >= 1 && 10#$MIN_NP <= 10#$NP )) \
        || die "--min-np=$MIN_NP: must be 1..-np ($NP)"
    [[ -z "$MAX_NP" ]] || (( 10#$MAX_NP >= 10#$NP )) \
        || die "--max-np=$MAX_NP: must be at least -np ($NP)"
    if [[ -n "$COOLDOWN" ]]; then
        [[ "$COOLDOWN" =~ ^[0-9]+\ [0-9]+$ ]] && read -r lo hi <<< "$COOLDOWN" \
            && (( 10#$lo >= 1 && 10#$lo <= 10#$hi && 10#$hi <= 3600 )) \
            || die "--blacklist-cooldown-range='$COOLDOWN': must be \"MIN MAX\" seconds, 1 <= MIN <= MAX <= 3600"
    fi
    is_lars_train && PROGRAM+=(--elastic)
else
    declare -A ELASTIC_FLAG=([DISCOVERY]=--host-discovery-script [MIN_NP]=--min-np
                             [MAX_NP]=--max-np [ELASTIC_TIMEOUT]=--elastic-timeout
                             [COOLDOWN]=--blacklist-cooldown-range)
    for v in "${!ELASTIC_FLAG[@]}"; do
        [[ -z "${!v}" ]] || die "${ELASTIC_FLAG[$v]} needs --elastic"
    done
    HOSTS="$(read_hosts "$HOST_ARGS" "$HOSTFILE")"
    HOSTS="$(fill_slots "$HOSTS" "$GPUS_PER_HOST")"
    NP="${NP:-$(total_slots "$HOSTS")}"
    check_np "$NP" "$HOSTS"
fi

if [[ -n "$NIC" ]]; then
    setvar NCCL_SOCKET_IFNAME "$NIC"
fi
if [[ -z "$CONTROLLER" ]]; then
    CONTROLLER="--gloo"
    command -v mpirun >/dev/null 2>&1 && CONTROLLER="--mpi"
fi
if [[ "$CONTROLLER" == --gloo && "${HOROVOD_STALL_SHUTDOWN_TIME_SECONDS:-0}" != 0 ]]; then
    echo "$(basename "$0"): note: under Gloo, Horovod 0.28.1 reports no stalled rank and does" \
         "not shut a stalled job down (HOROVOD_STALL_SHUTDOWN_TIME_SECONDS); use --mpi for that" >&2
fi
if [[ "$ELASTIC" == 1 ]]; then
    CMD=(horovodrun --gloo -np "$NP" --min-np "$MIN_NP" --slots-per-host "$GPUS_PER_HOST"
         --host-discovery-script "$(cd "$(dirname -- "$DISCOVERY")" && pwd)/$(basename -- "$DISCOVERY")")
    [[ -n "$MAX_NP" ]] && CMD+=(--max-np "$MAX_NP")
    [[ -n "$ELASTIC_TIMEOUT" ]] && CMD+=(--elastic-timeout "$ELASTIC_TIMEOUT")
    [[ -n "$COOLDOWN" ]] && CMD+=(--blacklist-cooldown-range $COOLDOWN)  # two words
    REMOTE_HOSTS=""  # hosts come and go: the job itself says which it lost
else
    CMD=(horovodrun "$CONTROLLER" -np "$NP" -H "$HOSTS")
    # horovodrun 0.28.1 passes Open MPI <= 4's single-dash "-bind-to none -map-by slot",
    # which Open MPI 5's mpirun rejects; give the binding in a form both accept.
    [[ "$CONTROLLER" == --mpi ]] && CMD+=(--binding-args "--bind-to none")
    REMOTE_HOSTS="$(remote_hosts "$HOSTS")"
fi
[[ -n "$NIC" ]] && CMD+=(--network-interface "$NIC")
show_and_run "${CMD[@]}" "${PROGRAM[@]}"
