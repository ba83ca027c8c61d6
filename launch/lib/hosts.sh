# Host lists (sourced by common.sh): "host:slots,..." from -H or a hostfile, checked
# before anything starts (slots 0: not given), and, after a failed job, which hosts no
# longer answer.

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
