# Shared by the launchers (sourced, never run). The launchers only set environment and
# call horovodrun / mpirun / srun; they import nothing of lars_tf.
#
# Order of precedence for a setting: launcher flag > variable already in the caller's
# environment > preset file > Horovod's own default.
#
# A launcher declares its own options in LAUNCHER_OPTIONS (format: lib/args.sh) and calls
# `parse_args "$@"`, the one argument loop, then `apply_settings`; its usage() prints
# `options_help` of its table and of TUNING_OPTIONS. The pieces: lib/args.sh (options,
# parsing, help), lib/env.sh (presets and the exported environment), lib/hosts.sh (host
# lists); this file holds the launch's state and the start.

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PRESET_DIR="$LAUNCH_DIR/presets"

die() {  # a bad-input error: exit 2 before anything has started
    printf '%s: error: %s\n' "$(basename "$0")" "$*" >&2
    exit 2
}

# ---- the launch's state: what parse_args read, what the launch exports ----------------
PRESET=single_node
DRY_RUN=0
FP16_ALLREDUCE=0
PROGRAM=()               # what every rank runs
declare -A OVERRIDES=()  # Horovod variables set by flags, applied over the preset
declare -A ORIGIN=()     # where each exported value came from
LT_VARS=()               # the variables this launch exports, in the order they were set

source "$LAUNCH_DIR/lib/args.sh"
source "$LAUNCH_DIR/lib/env.sh"
source "$LAUNCH_DIR/lib/hosts.sh"

# ---- start ---------------------------------------------------------------------------
resume_hint() {  # after a failed lars-train job: the newest checkpoint to go on from
    # (its rank 0, which says so itself, may have been ended by the launcher first)
    is_lars_train || return 0
    local arg prev="" dir="" newest=""
    for arg in "${PROGRAM[@]}"; do
        case "$arg" in --model_dir=*) dir="${arg#--model_dir=}" ;; esac
        [[ "$prev" == --model_dir ]] && dir="$arg"
        prev="$arg"
    done
    [[ -n "$dir" && -d "$dir/checkpoints" ]] || return 0
    for arg in "$dir"/checkpoints/epoch-*; do [[ -d "$arg" ]] && newest="$arg"; done
    [[ -z "$newest" ]] || echo "[launch] the newest checkpoint is $newest: continue from it" \
        "with --resume --model_dir=$dir" >&2
}

show_and_run() {  # show_and_run CMD...: --dry-run prints, otherwise runs it
    # With REMOTE_HOSTS set (a multi-host job), a failed job is followed by an ssh probe
    # that names the hosts that are gone: under Gloo a host lost without a word (power,
    # network) only shows as a collective timeout on the ranks left.
    local v
    if [[ "$DRY_RUN" == 1 ]]; then
        echo "# environment"
        for v in "${LT_VARS[@]}"; do
            printf 'export %s=%q  # %s\n' "$v" "${!v}" "${ORIGIN[$v]}"
        done
        echo "# command"
        printf '%q ' "$@"
        echo
        exit 0
    fi
    for v in "${LT_VARS[@]}"; do printf '[launch] %s=%s\n' "$v" "${!v}" >&2; done
    printf '[launch] %s\n' "$*" >&2
    [[ -z "${REMOTE_HOSTS:-}" ]] && exec "$@"
    local child rc=0
    "$@" &
    child=$!
    trap 'kill -TERM "$child" 2>/dev/null' TERM INT HUP
    wait "$child" || rc=$?
    while kill -0 "$child" 2>/dev/null; do wait "$child" || rc=$?; done  # after a signal
    trap - TERM INT HUP
    local -a remote
    mapfile -t remote <<< "$REMOTE_HOSTS"  # one a line: no word splitting, no globbing
    (( rc == 0 )) || { name_lost_hosts "${remote[@]}"; resume_hint; }
    exit "$rc"
}
