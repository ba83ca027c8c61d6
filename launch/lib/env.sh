# The environment a launch exports (sourced by common.sh): a preset's settings, under the
# caller's own variables, under the flags (a flag wins).

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

