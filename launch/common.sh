# Shared by the launchers (sourced, never run). The launchers only set environment and
# call horovodrun / mpirun / srun; they import nothing of lars_tf.
#
# Order of precedence for a setting: launcher flag > variable already in the caller's
# environment > preset file > Horovod's own default.

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PRESET_DIR="$LAUNCH_DIR/presets"
DRY_RUN=0
LT_VARS=()          # the variables this launch exports, in the order they were set
PROGRAM=()          # what every rank runs
FP16_ALLREDUCE=0

die() {  # a bad-input error: exit 2 before anything has started
    printf '%s: error: %s\n' "$(basename "$0")" "$*" >&2
    exit 2
}

setvar() {  # setvar NAME VALUE [ORIGIN]: export for every rank and remember for --dry-run
    local name="$1" value="$2" v
    export "$name=$value"
    ORIGIN[$name]="${3:-launcher}"
    for v in "${LT_VARS[@]}"; do [[ "$v" == "$name" ]] && return; done
    LT_VARS+=("$name")
}

declare -A ORIGIN=()     # where each exported value came from
declare -A OVERRIDES=()  # flag settings, applied over the preset
PRESET=single_node

presets() {  # the preset names, one line
    local f names=()
    for f in "$PRESET_DIR"/*.env; do names+=("$(basename "$f" .env)"); done
    printf '%s' "${names[*]}"
}

check_preset() {
    [[ -f "$PRESET_DIR/$1.env" ]] || die "--preset=$1: unknown preset (choose one of: $(presets))"
}

load_preset() {  # load_preset NAME: KEY=VALUE lines; the caller's environment wins
    local name="$1" file="$PRESET_DIR/$1.env" line key value
    check_preset "$name"
    while IFS= read -r line || [[ -n "$line" ]]; do
        line="${line%%#*}"
        line="${line#"${line%%[![:space:]]*}"}"
        line="${line%"${line##*[![:space:]]}"}"
        [[ -z "$line" ]] && continue
        [[ "$line" =~ ^([A-Z_][A-Z0-9_]*)=(.*)$ ]] \
            || die "preset $file: cannot read line '$line' (want KEY=VALUE)"
        key="${BASH_REMATCH[1]}" value="${BASH_REMATCH[2]}"
        if [[ -n "${!key+x}" ]]; then
            setvar "$key" "${!key}" "your environment"
        else
            setvar "$key" "$value" "preset $name"
        fi
    done < "$file"
}

apply_settings() {  # after parsing: the caller's HOROVOD_/NCCL_/KMP_/TF_* variables, the
    local key       # preset, then the flags over it
    while IFS= read -r key; do
        setvar "$key" "${!key}" "your environment"
    done < <(compgen -e | grep -E '^(HOROVOD_|NCCL_|KMP_|TF_(CPP|ENABLE|GPU|XLA|FORCE|NUM|DETERMINISTIC)_)' || true)
    load_preset "$PRESET"
    for key in "${!OVERRIDES[@]}"; do setvar "$key" "${OVERRIDES[$key]}" flag; done
}

need_value() {  # need_value FLAG "$#": the flag must have an argument
    [[ "$2" -ge 2 ]] || die "$1 needs a value"
}

uint() {  # uint FLAG VALUE: a non-negative integer
    [[ "$2" =~ ^[0-9]+$ ]] || die "$1=$2: must be an integer >= 0"
}

number() {  # number FLAG VALUE: a non-negative number
    [[ "$2" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "$1=$2: must be a number >= 0"
}

# The tuning flags every launcher takes. tuning_flag "$@" consumes one flag (returning the
# number of words used) or returns 0 when the flag is not one of these.
TUNING_HELP='Horovod tuning (override the preset):
  --preset NAME              environment preset from launch/presets/ (default: single_node)
  --fusion-threshold-mb N    tensor fusion buffer in MB (0: fusion off)
  --cycle-time-ms MS         how often Horovod fuses and launches queued all-reduces
  --cache-capacity N         response cache entries (0: off)
  --hierarchical-allreduce   reduce within each node first, then across nodes
  --no-hierarchical-allreduce
  --fp16-allreduce           send gradients as float16 (passes --fp16_allreduce to lars-train)
  --autotune                 let Horovod tune fusion threshold and cycle time while training
  --autotune-log-file FILE   where autotune writes its samples (CSV, rank 0)
  --timeline-filename FILE   Horovod timeline (Chrome trace JSON) of every tensor operation
  --stall-check-shutdown-time-seconds S
                             shut the job down when a rank has not submitted a tensor the
                             others wait for after S seconds (0: never)
(Tuning flags are spelled as horovodrun spells them.)
  --dry-run                  print the environment and the command, start nothing'

override() { OVERRIDES[$1]="$2"; }

TUNING_USED=0
tuning_flag() {
    TUNING_USED=0
    case "$1" in
        --preset) need_value "$1" "$#"; check_preset "$2"; PRESET="$2"; TUNING_USED=2 ;;
        --fusion-threshold-mb)
            need_value "$1" "$#"; uint "$1" "$2"
            override HOROVOD_FUSION_THRESHOLD "$(( $2 * 1024 * 1024 ))"; TUNING_USED=2 ;;
        --cycle-time-ms)
            need_value "$1" "$#"; number "$1" "$2"
            override HOROVOD_CYCLE_TIME "$2"; TUNING_USED=2 ;;
        --cache-capacity)
            need_value "$1" "$#"; uint "$1" "$2"
            override HOROVOD_CACHE_CAPACITY "$2"; TUNING_USED=2 ;;
        --hierarchical-allreduce) override HOROVOD_HIERARCHICAL_ALLREDUCE 1; TUNING_USED=1 ;;
        --no-hierarchical-allreduce) override HOROVOD_HIERARCHICAL_ALLREDUCE 0; TUNING_USED=1 ;;
        --fp16-allreduce) FP16_ALLREDUCE=1; TUNING_USED=1 ;;
        --autotune) override HOROVOD_AUTOTUNE 1; TUNING_USED=1 ;;
        --autotune-log-file)
            need_value "$1" "$#"; abspath_new "$1" "$2"; override HOROVOD_AUTOTUNE 1
            override HOROVOD_AUTOTUNE_LOG "$ABS"; TUNING_USED=2 ;;
        --timeline-filename)
            need_value "$1" "$#"; abspath_new "$1" "$2"
            override HOROVOD_TIMELINE "$ABS"; TUNING_USED=2 ;;
        --stall-check-shutdown-time-seconds)
            need_value "$1" "$#"; uint "$1" "$2"
            override HOROVOD_STALL_SHUTDOWN_TIME_SECONDS "$2"; TUNING_USED=2 ;;
        --autotune-log|--timeline|--stall-shutdown-sec)  # the names before horovodrun's
            local new
            new="$(renamed "$1")"
            die "$1 is now $new, as horovodrun spells it" ;;
        --dry-run) DRY_RUN=1; TUNING_USED=1 ;;
    esac
}

renamed() {  # renamed OLD_FLAG: the horovodrun name that replaced it
    case "$1" in
        --autotune-log) printf '%s' --autotune-log-file ;;
        --timeline) printf '%s' --timeline-filename ;;
        --stall-shutdown-sec) printf '%s' --stall-check-shutdown-time-seconds ;;
    esac
}

ABS=""
abspath_new() {  # abspath_new FLAG PATH: ABS = PATH made absolute; its folder must be writable
    local dir
    dir="$(dirname -- "$2")"
    [[ -d "$dir" && -w "$dir" ]] || die "$1=$2: folder $dir does not exist or is not writable"
    ABS="$(cd "$dir" && pwd)/$(basename -- "$2")"
}

set_program() {  # set_program ARGS...: what follows "--" (default program: lars-train)
    if [[ $# -eq 0 || "$1" == -* ]]; then
        PROGRAM=(lars-train "$@")
    else
        PROGRAM=("$@")
    fi
    if [[ "$FP16_ALLREDUCE" == 1 ]]; then
        [[ "$(basename -- "${PROGRAM[0]}")" == lars-train ]] \
            || die "--fp16-allreduce passes --fp16_allreduce to lars-train; your program" \
                   "${PROGRAM[0]} must take its own flag for it"
        PROGRAM+=(--fp16_allreduce)
    fi
}

# Hosts: "-H a:4,b:4" or a hostfile with lines "host slots=N" / "host:N" / "host".
HOSTS=()     # host names
SLOTS=()     # slots per host (0: not given)

parse_host_list() {  # parse_host_list FLAG "a:4,b,c:2"
    local item h s
    IFS=',' read -r -a items <<< "$2"
    for item in "${items[@]}"; do
        [[ -n "$item" ]] || continue
        h="${item%%:*}" s=0
        [[ "$item" == *:* ]] && s="${item#*:}"
        [[ "$s" =~ ^[0-9]+$ ]] || die "$1: '$item': slots must be an integer (host:slots)"
        HOSTS+=("$h") SLOTS+=("$s")
    done
    [[ ${#HOSTS[@]} -gt 0 ]] || die "$1: no hosts given"
}

parse_hostfile() {  # parse_hostfile FLAG FILE
    local file="$2" line h s
    [[ -f "$file" ]] || die "$1=$file: no such hostfile"
    [[ -r "$file" ]] || die "$1=$file: cannot be read"
    while IFS= read -r line || [[ -n "$line" ]]; do
        line="${line%%#*}"
        read -r h rest <<< "$line"
        [[ -z "$h" ]] && continue
        s=0
        if [[ "$h" == *:* ]]; then
            s="${h#*:}" h="${h%%:*}"
        elif [[ "$rest" =~ slots=([0-9]+) ]]; then
            s="${BASH_REMATCH[1]}"
        fi
        [[ "$s" =~ ^[0-9]+$ ]] || die "$1=$file: line '$line': slots must be an integer"
        HOSTS+=("$h") SLOTS+=("$s")
    done < "$file"
    [[ ${#HOSTS[@]} -gt 0 ]] || die "$1=$file: the hostfile lists no hosts"
}

read_hosts() {  # read_hosts "-H value" "--hostfile value": one of them, default localhost
    [[ -n "$1" && -n "$2" ]] && die "give -H or --hostfile, not both"
    if [[ -n "$2" ]]; then
        parse_hostfile --hostfile "$2"
    else
        parse_host_list -H "${1:-localhost}"
    fi
}

fill_slots() {  # fill_slots N: hosts without a slot count get N
    local i
    for i in "${!SLOTS[@]}"; do
        [[ "${SLOTS[$i]}" == 0 ]] && SLOTS[$i]="$1"
    done
    return 0
}

total_slots() {
    local s t=0
    for s in "${SLOTS[@]}"; do t=$(( t + s )); done
    printf '%d' "$t"
}

host_list() {  # a:4,b:4
    local i out=()
    for i in "${!HOSTS[@]}"; do out+=("${HOSTS[$i]}:${SLOTS[$i]}"); done
    local IFS=,
    printf '%s' "${out[*]}"
}

check_np() {  # check_np NP: the hosts must offer at least NP slots
    local slots
    slots="$(total_slots)"
    [[ "$1" =~ ^[1-9][0-9]*$ ]] || die "-np=$1: must be an integer >= 1"
    (( $1 <= slots )) || die "-np=$1: more processes than the $slots slots the hosts offer ($(host_list))"
}

show_and_run() {  # show_and_run CMD...: --dry-run prints, otherwise exec
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
    exec "$@"
}
