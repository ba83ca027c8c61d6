# Shared by the launchers (sourced, never run). The launchers only set environment and
# call horovodrun / mpirun / srun; they import nothing of lars_tf.
#
# Order of precedence for a setting: launcher flag > variable already in the caller's
# environment > preset file > Horovod's own default.
#
# A launcher declares its own options in LAUNCHER_OPTIONS and calls `parse_args "$@"`, the
# one argument loop (below); the functions after it take their input as arguments and
# print their result.

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

# ---- options -----------------------------------------------------------------------
# One entry per option: "FLAG[|ALIAS] TARGET KIND". TARGET is a shell variable of the
# launcher, or env:NAME for a Horovod variable that goes over the preset. KIND says what
# the option takes: value (the next word as given), uint, number, mb (megabytes, stored in
# bytes), newfile (a file to write: made absolute, its folder must be writable), preset
# (a name in launch/presets/), or =VALUE for a switch that takes no word.
TUNING_OPTIONS=(
    "--preset PRESET preset"
    "--fusion-threshold-mb env:HOROVOD_FUSION_THRESHOLD mb"
    "--cycle-time-ms env:HOROVOD_CYCLE_TIME number"
    "--cache-capacity env:HOROVOD_CACHE_CAPACITY uint"
    "--hierarchical-allreduce env:HOROVOD_HIERARCHICAL_ALLREDUCE =1"
    "--no-hierarchical-allreduce env:HOROVOD_HIERARCHICAL_ALLREDUCE =0"
    "--fp16-allreduce FP16_ALLREDUCE =1"
    "--autotune env:HOROVOD_AUTOTUNE =1"
    "--autotune-log-file env:HOROVOD_AUTOTUNE_LOG newfile"
    "--timeline-filename env:HOROVOD_TIMELINE newfile"
    "--stall-check-shutdown-time-seconds env:HOROVOD_STALL_SHUTDOWN_TIME_SECONDS uint"
    "--dry-run DRY_RUN =1"
)
# The launchers' names before they were spelled as horovodrun spells them.
declare -A RENAMED=([--autotune-log]=--autotune-log-file [--timeline]=--timeline-filename
                    [--stall-shutdown-sec]=--stall-check-shutdown-time-seconds)

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

option_spec() {  # option_spec WORD: "TARGET KIND" of the option WORD names; 1 if none does
    local entry flags target kind alias aliases
    for entry in "${TUNING_OPTIONS[@]}" "${LAUNCHER_OPTIONS[@]}"; do
        read -r flags target kind <<< "$entry"
        IFS='|' read -ra aliases <<< "$flags"
        for alias in "${aliases[@]}"; do
            if [[ "$alias" == "$1" ]]; then
                printf '%s %s' "$target" "$kind"
                return 0
            fi
        done
    done
    return 1
}

checked() {  # checked FLAG KIND VALUE: VALUE as the option stores it, or exit 2 naming FLAG
    local dir
    case "$2" in
        value) printf '%s' "$3" ;;
        # numbers are decimal whatever their leading zeros (bash reads 010 as octal 8)
        uint) [[ "$3" =~ ^[0-9]+$ ]] || die "$1=$3: must be an integer >= 0"
              printf '%d' "$(( 10#$3 ))" ;;
        number) [[ "$3" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "$1=$3: must be a number >= 0"
                printf '%s' "$3" ;;
        mb) [[ "$3" =~ ^[0-9]+$ ]] || die "$1=$3: must be an integer >= 0"
            printf '%d' "$(( 10#$3 * 1024 * 1024 ))" ;;
        preset) [[ "$3" =~ ^[A-Za-z0-9_-]+$ && -f "$PRESET_DIR/$3.env" ]] \
                    || die "$1=$3: unknown preset (choose one of: $(preset_names))"
                printf '%s' "$3" ;;
        newfile) dir="$(dirname -- "$3")"
                 [[ -d "$dir" && -w "$dir" ]] \
                     || die "$1=$3: folder $dir does not exist or is not writable"
                 printf '%s/%s' "$(cd "$dir" && pwd)" "$(basename -- "$3")" ;;
        *) die "internal: option $1 has an unknown kind '$2'" ;;
    esac
}

parse_args() {  # parse_args "$@": every option, then the program after "--" (set_program)
    local word spec target kind value
    while [[ $# -gt 0 ]]; do
        word="$1"
        case "$word" in
            -h|--help) usage; exit 0 ;;
            --) shift; break ;;
        esac
        [[ -z "${RENAMED[$word]:-}" ]] || die "$word is now ${RENAMED[$word]}, as horovodrun spells it"
        spec="$(option_spec "$word")" \
            || die "unknown option '$word' (see --help; lars-train's flags go after --)"
        read -r target kind <<< "$spec"
        if [[ "$kind" == =* ]]; then
            value="${kind#=}"
            shift
        else
            [[ $# -ge 2 ]] || die "$word needs a value"
            value="$(checked "$word" "$kind" "$2")"
            shift 2
        fi
        if [[ "$target" == env:* ]]; then
            OVERRIDES[${target#env:}]="$value"
        else
            printf -v "$target" '%s' "$value"
        fi
    done
    # an autotune log is only written while autotuning
    [[ -z "${OVERRIDES[HOROVOD_AUTOTUNE_LOG]:-}" ]] || OVERRIDES[HOROVOD_AUTOTUNE]=1
    set_program "$@"
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

is_lars_train() { [[ "$(basename -- "${PROGRAM[0]}")" == lars-train ]]; }

# ---- environment: presets, the caller's variables, the flags -------------------------
setvar() {  # setvar NAME VALUE [ORIGIN]: export for every rank and remember for --dry-run
    local name="$1" value="$2" v
    export "$name=$value"
    ORIGIN[$name]="${3:-launcher}"
    for v in "${LT_VARS[@]}"; do [[ "$v" == "$name" ]] && return; done
    LT_VARS+=("$name")
}

preset_names() {  # the preset names, one line
    local f names=()
    for f in "$PRESET_DIR"/*.env; do names+=("$(basename "$f" .env)"); done
    printf '%s' "${names[*]}"
}

preset_lines() {  # preset_lines NAME: the preset's settings, one KEY=VALUE a line
    local file="$PRESET_DIR/$1.env" line
    while IFS= read -r line || [[ -n "$line" ]]; do
        line="${line%%#*}"
        line="${line#"${line%%[![:space:]]*}"}"
        line="${line%"${line##*[![:space:]]}"}"
        [[ -z "$line" ]] && continue
        [[ "$line" =~ ^[A-Z_][A-Z0-9_]*=.*$ ]] \
            || die "preset $file: cannot read line '$line' (want KEY=VALUE)"
        printf '%s\n' "$line"
    done < "$file"
}

apply_settings() {  # after parse_args: the caller's HOROVOD_/NCCL_/KMP_/TF_* variables,
    local key value lines  # the preset under them, then the flags over both
    while IFS= read -r key; do
        setvar "$key" "${!key}" "your environment"
    done < <(compgen -e | grep -E '^(HOROVOD_|NCCL_|KMP_|TF_(CPP|ENABLE|GPU|XLA|FORCE|NUM|DETERMINISTIC)_)' || true)
    lines="$(preset_lines "$PRESET")"
    while IFS='=' read -r key value; do
        [[ -n "$key" ]] || continue
        if [[ -n "${!key+x}" ]]; then
            setvar "$key" "${!key}" "your environment"
        else
            setvar "$key" "$value" "preset $PRESET"
        fi
    done <<< "$lines"
    for key in "${!OVERRIDES[@]}"; do setvar "$key" "${OVERRIDES[$key]}" flag; done
}

# ---- hosts: a list "host:slots,..." (slots 0: not given) ----------------------------
valid_host() {  # valid_host NAME: an RFC 1123 host name or an IPv4 address (nothing that a
    local label labels octet  # shell, ssh or a glob could read as anything else)
    local name="$1"
    if [[ "$name" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
        IFS=. read -ra labels <<< "$name"
        for octet in "${labels[@]}"; do
            [[ ${#octet} -le 3 ]] && (( 10#$octet <= 255 )) || return 1
        done
        return 0
    fi
    [[ ${#name} -ge 1 && ${#name} -le 253 && "$name" != .* && "$name" != *..* ]] || return 1
    IFS=. read -ra labels <<< "${name%.}"
    for label in "${labels[@]}"; do
        [[ "$label" =~ ^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$ ]] || return 1
    done
}

check_host() {  # check_host WHERE ENTRY HOST: exit 2 naming the entry unless HOST is valid
    if [[ "$2" == *:*:* ]]; then
        die "$1: '$2': IPv6 addresses cannot be given in host:slots lists (horovodrun" \
            "and mpirun split them at every ':'): give the host's name"
    fi
    valid_host "$3" && return
    die "$1: '$2': '$3' is not a host name (RFC 1123: letters, digits and '-' in" \
        "dot-separated labels) or an IPv4 address"
}

host_list_arg() {  # host_list_arg FLAG "a:4,b,c:2": the list, every host with its slots
    local item h s out=() items
    IFS=',' read -r -a items <<< "$2"
    for item in "${items[@]}"; do
        [[ -n "$item" ]] || continue
        h="${item%%:*}" s=0
        [[ "$item" == *:* ]] && s="${item#*:}"
        check_host "$1" "$item" "$h"
        [[ "$s" =~ ^[0-9]+$ ]] || die "$1: '$item': slots must be an integer (host:slots)"
        out+=("$h:$(( 10#$s ))")
    done
    [[ ${#out[@]} -gt 0 ]] || die "$1: no hosts given"
    (IFS=,; printf '%s' "${out[*]}")
}

hostfile_list() {  # hostfile_list FLAG FILE: lines "host slots=N", "host:N" or "host"
    local file="$2" line h rest s out=()
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
        check_host "$1=$file" "$line" "$h"
        [[ "$s" =~ ^[0-9]+$ ]] || die "$1=$file: line '$line': slots must be an integer"
        out+=("$h:$(( 10#$s ))")
    done < "$file"
    [[ ${#out[@]} -gt 0 ]] || die "$1=$file: the hostfile lists no hosts"
    (IFS=,; printf '%s' "${out[*]}")
}

read_hosts() {  # read_hosts H_VALUE HOSTFILE: the list from -H or --hostfile (default localhost)
    [[ -n "$1" && -n "$2" ]] && die "give -H or --hostfile, not both"
    if [[ -n "$2" ]]; then
        hostfile_list --hostfile "$2"
    else
        host_list_arg -H "${1:-localhost}"
    fi
}

fill_slots() {  # fill_slots LIST N: hosts without a slot count get N
    local item out=() items
    IFS=',' read -r -a items <<< "$1"
    for item in "${items[@]}"; do
        [[ "${item#*:}" == 0 ]] && item="${item%%:*}:$2"
        out+=("$item")
    done
    (IFS=,; printf '%s' "${out[*]}")
}

set_slots() {  # set_slots LIST N: every host gets N slots
    local item out=() items
    IFS=',' read -r -a items <<< "$1"
    for item in "${items[@]}"; do out+=("${item%%:*}:$2"); done
    (IFS=,; printf '%s' "${out[*]}")
}

total_slots() {  # total_slots LIST
    local item t=0 items
    IFS=',' read -r -a items <<< "$1"
    for item in "${items[@]}"; do t=$(( t + ${item#*:} )); done
    printf '%d' "$t"
}

host_names() {  # host_names LIST: a,b,...
    local item out=() items
    IFS=',' read -r -a items <<< "$1"
    for item in "${items[@]}"; do out+=("${item%%:*}"); done
    (IFS=,; printf '%s' "${out[*]}")
}

check_np() {  # check_np NP LIST: the hosts must offer at least NP slots
    local slots
    slots="$(total_slots "$2")"
    [[ "$1" =~ ^[1-9][0-9]*$ ]] || die "-np=$1: must be an integer >= 1"
    (( $1 <= slots )) || die "-np=$1: more processes than the $slots slots the hosts offer ($2)"
}

# ---- start ---------------------------------------------------------------------------
remote_hosts() {  # remote_hosts LIST: the hosts that are not this one, a line each
    local h items
    IFS=',' read -r -a items <<< "$(host_names "$1")"
    for h in "${items[@]}"; do
        case "$h" in localhost|127.*|"$(hostname)"|"$(hostname -s)") ;; *) echo "$h" ;; esac
    done
}

name_lost_hosts() {  # name_lost_hosts HOST...: say which hosts no longer answer ssh (5 s)
    local h i lost=() pids=()
    for h in "$@"; do
        ssh -o BatchMode=yes -o ConnectTimeout=5 -- "$h" true >/dev/null 2>&1 &
        pids+=($!)
    done
    i=0
    for h in "$@"; do
        wait "${pids[$i]}" || lost+=("$h")
        i=$((i + 1))
    done
    if (( ${#lost[@]} )); then
        echo "[launch] the job failed and these hosts no longer answer ssh: ${lost[*]}" \
             "(lost: the ranks on them ended the job; resume on the others with --resume)" >&2
    fi
}

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
