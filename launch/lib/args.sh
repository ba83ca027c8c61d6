# The launchers' arguments (sourced by common.sh): the option table, its one parser, and
# --help's text generated from the table.

# One entry per option: "FLAG[|ALIAS] TARGET KIND # METAVAR # help". TARGET is a shell
# variable of the launcher, or env:NAME for a Horovod variable that goes over the preset.
# KIND says what the option takes: value (the next word as given), uint, number, mb
# (megabytes, stored in bytes), newfile (a file to write: made absolute, its folder must
# be writable), preset (a name in launch/presets/), or =VALUE for a switch that takes no
# word. METAVAR names the word in --help ("-" for a switch). Entries "## Title" and
# "#. note" are --help's section titles and notes (options_help prints the table).
TUNING_OPTIONS=(
    "## Horovod tuning (override the preset):"
    "--preset PRESET preset # NAME # environment preset from launch/presets/ (default: single_node)"
    "--fusion-threshold-mb env:HOROVOD_FUSION_THRESHOLD mb # N # tensor fusion buffer in MB (0: fusion off)"
    "--cycle-time-ms env:HOROVOD_CYCLE_TIME number # MS # how often Horovod fuses and launches queued all-reduces"
    "--cache-capacity env:HOROVOD_CACHE_CAPACITY uint # N # response cache entries (0: off)"
    "--hierarchical-allreduce env:HOROVOD_HIERARCHICAL_ALLREDUCE =1 # - # reduce within each node first, then across nodes"
    "--no-hierarchical-allreduce env:HOROVOD_HIERARCHICAL_ALLREDUCE =0 # - # one ring over every rank"
    "--fp16-allreduce FP16_ALLREDUCE =1 # - # send gradients as float16 (passes --fp16_allreduce to lars-train)"
    "--autotune env:HOROVOD_AUTOTUNE =1 # - # let Horovod tune fusion threshold and cycle time while training"
    "--autotune-log-file env:HOROVOD_AUTOTUNE_LOG newfile # FILE # where autotune writes its samples (CSV, rank 0)"
    "--timeline-filename env:HOROVOD_TIMELINE newfile # FILE # Horovod timeline (Chrome trace JSON) of every tensor operation"
    "--stall-check-shutdown-time-seconds env:HOROVOD_STALL_SHUTDOWN_TIME_SECONDS uint # S # shut the job down when a rank has not submitted a tensor the others wait for after S seconds (0: never)"
    "#. (Tuning flags are spelled as horovodrun spells them.)"
    "--dry-run DRY_RUN =1 # - # print the environment and the command, start nothing"
)
# The launchers' names before they were spelled as horovodrun spells them.
declare -A RENAMED=([--autotune-log]=--autotune-log-file [--timeline]=--timeline-filename
                    [--stall-shutdown-sec]=--stall-check-shutdown-time-seconds)


option_spec() {  # option_spec WORD: "TARGET KIND" of the option WORD names; 1 if none does
    local entry flags target kind alias aliases
    for entry in "${TUNING_OPTIONS[@]}" "${LAUNCHER_OPTIONS[@]}"; do
        [[ "$entry" == "#"* ]] && continue
        read -r flags target kind _ <<< "${entry%% # *}"
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

options_help() {  # options_help ENTRY...: --help's text of these option entries
    local entry flags meta text names first=1 line
    local -a wrapped
    for entry in "$@"; do
        case "$entry" in
            "## "*) (( first )) || echo; printf '%s\n' "${entry#"## "}"; first=0; continue ;;
            "#. "*) printf '%s\n' "${entry#"#. "}"; continue ;;
        esac
        first=0
        [[ "$entry" == *" # "*" # "* ]] || die "internal: option '$entry' has no help"
        flags="${entry%% *}"
        meta="${entry#* # }"
        text="${meta#* # }"
        meta="${meta%% # *}"
        names="${flags//|/, }"
        [[ "$meta" == - ]] || names+=" $meta"
        mapfile -t wrapped < <(fold -s -w 60 <<< "$text" | sed 's/ *$//')
        if (( ${#names} > 26 )); then
            printf '  %s\n' "$names"
        else
            printf '  %-26s %s\n' "$names" "${wrapped[0]}"
            wrapped=("${wrapped[@]:1}")
        fi
        for line in ${wrapped[@]+"${wrapped[@]}"}; do printf '%29s%s\n' "" "$line"; done
    done
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

