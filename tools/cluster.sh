#!/usr/bin/env bash
# A cluster of N hosts on this machine, in network namespaces: see usage() below.
set -euo pipefail

DIR=${LARS_TF_CLUSTER_DIR:-/tmp/lars_tf_cluster}
SWITCH=lars-switch
NET=198.18.0

MARKER=.made-by-lars_tf-cluster  # in $DIR: what `down` may delete

usage() {
    cat >&2 <<'USAGE'
A cluster of N hosts on this machine: network namespaces h1..hN, each with its own network
stack, hostname, address (198.18.0.i, the benchmarking range, inside the namespaces only)
and sshd, linked through a bridge by veth pairs shaped with tc. The hosts share this
machine's filesystem, as cluster nodes share a home directory.

  tools/cluster.sh up N [none|10gbe|1gbe]   start h1..hN (links unshaped by default)
  tools/cluster.sh run HOST CMD...          run CMD on HOST (its network and hostname)
  tools/cluster.sh kill HOST                kill every process on HOST, take its link down
  tools/cluster.sh revive HOST              bring a killed HOST back (link up, sshd)
  tools/cluster.sh slurm                    start Slurm on the hosts (slurmctld on h1)
  tools/cluster.sh status                   hosts, addresses, links, sshd pids
  tools/cluster.sh down                     stop everything, leave nothing behind

Links: "10gbe" = 10 Gbit/s and "1gbe" = 1 Gbit/s per host (tbf on each host's egress).
Latency is not added: this kernel has no netem qdisc (the script says so if asked for it).
ssh: host keys and a client key are made in the cluster's folder ($LARS_TF_CLUSTER_DIR,
default /tmp/lars_tf_cluster); `ssh` on the PATH that `run` gives is a wrapper that uses the
cluster's ssh config, so horovodrun and mpirun reach the hosts by name (h1, h2, ...) and
nothing in ~/.ssh is read or changed. Sessions send keepalives (every 2 s, 3 missed: gone),
so a session to a host that vanished ends within about 6 s, as a cluster's ssh should be
set up for elastic jobs (horovodrun counts a rank lost when its ssh session ends).
Needs root, iproute2 and Debian's openssh-server.
Slurm (Debian's slurm-wlm and munge): one partition "all" of every host, munged with a key
of the cluster's own, slurmctld on h1 and slurmd on every host, all inside the hosts (so
down stops them); `run` sets SLURM_CONF so that sbatch/srun/sinfo there use it.
USAGE
}

die() { echo "cluster.sh: $*" >&2; exit 2; }

hosts() { [[ -f $DIR/hosts ]] && cat "$DIR/hosts"; true; }

check_can_run() {
    [[ $(id -u) -eq 0 ]] || die "needs root (network namespaces, veth links, sshd)"
    command -v ip >/dev/null || die "needs iproute2 (ip)"
    [[ -x /usr/sbin/sshd ]] || die "needs /usr/sbin/sshd (Debian's openssh-server; make setup installs it as root)"
    ip netns add lars-probe 2>/dev/null || die "this kernel or sandbox does not allow network namespaces (ip netns add failed)"
    ip netns del lars-probe
}

shape() {  # shape NS LINK: the host's egress
    local ns=$1 link=$2
    case $link in
        none) ;;
        10gbe) ip netns exec "$ns" tc qdisc add dev eth0 root tbf rate 10gbit burst 2mb latency 10ms ;;
        1gbe) ip netns exec "$ns" tc qdisc add dev eth0 root tbf rate 1gbit burst 256kb latency 10ms ;;
        *) die "link '$link': choose none, 10gbe or 1gbe" ;;
    esac
}

up() {
    local n=${1:-} link=${2:-none}
    [[ $n =~ ^[0-9]+$ && $n -ge 1 && $n -le 32 ]] || die "up N: N must be 1..32 hosts, got '${n}'"
    case $link in none|10gbe|1gbe) ;; *) die "link '$link': choose none, 10gbe or 1gbe (no latency: this kernel has no netem)" ;; esac
    check_can_run
    local i
    for i in $(seq 1 "$n"); do
        ip netns list | grep -qw "h$i" && die "a network namespace h$i exists already (not ours: $DIR is missing)"
    done
    # made in one step, private, and only if absent: a second `up` (or anyone else's
    # folder of that name) is refused, never reused
    mkdir -m 700 "$DIR" 2>/dev/null \
        || die "$DIR exists: a cluster is up, or the folder is not ours (tools/cluster.sh down first)"
    : > "$DIR/$MARKER"
    mkdir -p "$DIR/bin" /run/sshd
    trap 'down >/dev/null 2>&1 || true' EXIT  # a failure (die, too) leaves nothing
    ssh-keygen -q -t ed25519 -N "" -C lars_tf-cluster -f "$DIR/client_key"
    ssh-keygen -q -t ed25519 -N "" -C lars_tf-cluster-host -f "$DIR/host_key"
    cp "$DIR/client_key.pub" "$DIR/authorized_keys"
    cat > "$DIR/sshd_config" <<EOF
HostKey $DIR/host_key
AuthorizedKeysFile $DIR/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
MaxStartups 100
MaxSessions 100
SetEnv PATH=$PATH
EOF
    cat > "$DIR/ssh_config" <<EOF
Host *
    User root
    IdentityFile $DIR/client_key
    IdentitiesOnly yes
    UserKnownHostsFile $DIR/known_hosts
    StrictHostKeyChecking yes
    BatchMode yes
    ConnectTimeout 5
    ServerAliveInterval 2
    ServerAliveCountMax 3
    LogLevel ERROR
EOF
    printf '#!/bin/sh\nexec /usr/bin/ssh -F %s "$@"\n' "$DIR/ssh_config" > "$DIR/bin/ssh"
    chmod +x "$DIR/bin/ssh"

    ip netns add "$SWITCH"
    ip -n "$SWITCH" link add br0 type bridge
    ip -n "$SWITCH" link set br0 up
    local etc_hosts="127.0.0.1 localhost"$'\n'
    for i in $(seq 1 "$n"); do etc_hosts+="$NET.$i h$i"$'\n'; done
    : > "$DIR/known_hosts"
    for i in $(seq 1 "$n"); do
        local h=h$i
        ip netns add "$h"
        echo "$h" >> "$DIR/hosts"
        mkdir -p "/etc/netns/$h"
        printf '%s' "$etc_hosts" > "/etc/netns/$h/hosts"
        echo "$h" > "/etc/netns/$h/hostname"
        ip -n "$SWITCH" link add "$h" type veth peer name eth0 netns "$h"
        ip -n "$SWITCH" link set "$h" master br0 up
        ip -n "$h" addr add "$NET.$i/24" dev eth0
        ip -n "$h" link set eth0 up
        ip -n "$h" link set lo up
        shape "$h" "$link"
        echo "$h,$NET.$i $(cut -d' ' -f1,2 "$DIR/host_key.pub")" >> "$DIR/known_hosts"
        start_sshd "$h"
    done
    echo "$link" > "$DIR/link"
    for i in $(seq 1 "$n"); do  # every host reaches every other one by name
        local t
        for t in $(seq 1 50); do
            run h1 ssh "h$i" true 2>/dev/null && break
            [[ $t -eq 50 ]] && die "sshd on h$i does not answer"
            sleep 0.1
        done
    done
    trap - EXIT
    echo "cluster up: $(hosts | tr '\n' ' ')(links: $link; folder $DIR)"
}

run() {  # run HOST CMD...: inside HOST's network namespace, with its hostname
    local h=${1:-}; shift || true
    [[ -n $h ]] && hosts | grep -qx "$h" || die "run: no host '$h' (hosts: $(hosts | tr '\n' ' '))"
    [[ $# -gt 0 ]] || die "run $h: give a command"
    [[ -f $DIR/slurm/slurm.conf ]] && export SLURM_CONF=$DIR/slurm/slurm.conf
    PATH="$DIR/bin:$PATH" ip netns exec "$h" unshare --uts /bin/sh -c \
        'hostname "$0" && exec /usr/bin/env -u _ "$@"' "$h" "$@"
}

kill_host() {  # every process on HOST killed, its link down: the host is gone
    local h=${1:-}
    hosts | grep -qx "$h" || die "kill: no host '$h'"
    ip -n "$SWITCH" link set "$h" down 2>/dev/null || true
    local pids
    pids=$(ip netns pids "$h" 2>/dev/null || true)
    [[ -n $pids ]] && kill -9 $pids 2>/dev/null || true
}

start_sshd() {  # start_sshd HOST
    local h=$1 i=${1#h}
    run "$h" /usr/sbin/sshd -f "$DIR/sshd_config" -o "ListenAddress=$NET.$i" \
        -o "PidFile=$DIR/$h.sshd.pid"
}

revive() {
    local h=${1:-}
    hosts | grep -qx "$h" || die "revive: no host '$h'"
    ip -n "$SWITCH" link set "$h" up
    ip netns pids "$h" | grep -q . || start_sshd "$h"
}

slurm() {  # Slurm across the hosts: munged, slurmctld on h1, slurmd on every host
    [[ -d $DIR ]] || die "slurm: no cluster (tools/cluster.sh up N first)"
    [[ -x /usr/sbin/slurmctld && -x /usr/sbin/slurmd && -x /usr/sbin/munged ]] \
        || die "slurm: needs Debian's slurm-wlm and munge (make setup installs them as root)"
    [[ -e $DIR/slurm ]] && die "slurm: already started ($DIR/slurm exists)"
    local d=$DIR/slurm h i cpus
    cpus=$(nproc)
    mkdir -p "$d/state" "$d/log" "$d/munge"
    chmod 700 "$d/munge"
    head -c 1024 /dev/urandom > "$d/munge/key"
    chmod 400 "$d/munge/key"
    {
        echo "ClusterName=lars_tf"
        echo "SlurmctldHost=h1($NET.1)"
        echo "SlurmUser=root"
        echo "AuthType=auth/munge"
        echo "AuthInfo=socket=$d/munge/socket"
        echo "CredType=cred/munge"
        echo "StateSaveLocation=$d/state"
        echo "SlurmdSpoolDir=$d/spool-%n"
        echo "SlurmctldPidFile=$d/slurmctld.pid"
        echo "SlurmdPidFile=$d/slurmd-%n.pid"
        echo "SlurmctldLogFile=$d/log/slurmctld.log"
        echo "SlurmdLogFile=$d/log/slurmd-%n.log"
        # no cgroups of its own: processes are tracked by their parents, tasks not confined
        echo "ProctrackType=proctrack/linuxproc"
        echo "TaskPlugin=task/none"
        echo "JobAcctGatherType=jobacct_gather/none"
        echo "AccountingStorageType=accounting_storage/none"
        echo "SelectType=select/cons_tres"
        echo "SelectTypeParameters=CR_Core"
        echo "MpiDefault=none"
        echo "ReturnToService=2"
        for h in $(hosts); do
            i=${h#h}
            echo "NodeName=$h NodeAddr=$NET.$i CPUs=$cpus State=UNKNOWN"
            mkdir -p "$d/spool-$h"
        done
        echo "PartitionName=all Nodes=$(hosts | paste -sd,) Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
    } > "$d/slurm.conf"
    # slurmd initialises a cgroup plugin even with task/none, and its autodetection fails on
    # a v1 hierarchy under a tmpfs (as here): name v1 then; on a cgroup2 machine (untested)
    # let it detect
    local plugin=cgroup/v1
    [[ $(stat -fc %T /sys/fs/cgroup 2>/dev/null) == cgroup2fs ]] && plugin=autodetect
    printf 'CgroupPlugin=%s\nCgroupMountpoint=/sys/fs/cgroup\nCgroupAutomount=no\n' "$plugin" \
        > "$d/cgroup.conf"
    run h1 /usr/sbin/munged --key-file="$d/munge/key" --socket="$d/munge/socket" \
        --pid-file="$d/munge/pid" --log-file="$d/munge/log" --seed-file="$d/munge/seed" -f
    run h1 /usr/sbin/slurmctld -f "$d/slurm.conf"
    for h in $(hosts); do run "$h" /usr/sbin/slurmd -f "$d/slurm.conf" -N "$h"; done
    local t
    for t in $(seq 1 100); do  # every node idle
        [[ $(run h1 sinfo -h -o %t 2>/dev/null | tr -d ' \n') == idle ]] && break
        [[ $t -eq 100 ]] && die "slurm: the nodes did not come up ($d/log)"
        sleep 0.2
    done
    echo "slurm up: partition all = $(hosts | paste -sd,) (config $d/slurm.conf)"
}

status() {
    [[ -d $DIR ]] || { echo "no cluster ($DIR does not exist)"; return 0; }
    echo "links: $(cat "$DIR/link" 2>/dev/null)"
    local h
    for h in $(hosts); do
        echo "$h: $(ip -n "$h" -4 -o addr show dev eth0 2>/dev/null | awk '{print $4}')" \
             "sshd $(cat "$DIR/$h.sshd.pid" 2>/dev/null || echo -)" \
             "processes $(ip netns pids "$h" 2>/dev/null | wc -l)"
    done
}

down() {
    local h pid pids=() deadline
    if [[ -e $DIR && ! -f $DIR/$MARKER ]]; then
        die "LARS_TF_CLUSTER_DIR=$DIR was not made by tools/cluster.sh up: not deleting it"
    fi
    for h in $(hosts); do
        mapfile -t -O "${#pids[@]}" pids < <(ip netns pids "$h" 2>/dev/null || true)
    done
    (( ${#pids[@]} )) && kill -9 "${pids[@]}" 2>/dev/null || true
    # the daemons (sshd, slurmd, ...) are gone before down returns, not seconds later
    deadline=$((SECONDS + 30))
    for pid in "${pids[@]}"; do
        while [[ -e /proc/$pid ]] && (( SECONDS < deadline )); do sleep 0.05; done
    done
    for h in $(hosts); do
        ip netns del "$h" 2>/dev/null || true
        rm -rf "/etc/netns/$h"
    done
    ip netns del "$SWITCH" 2>/dev/null || true
    rmdir /etc/netns 2>/dev/null || true
    rm -rf "$DIR"
}

case ${1:-} in
    up) shift; up "$@" ;;
    run) shift; run "$@" ;;
    kill) shift; kill_host "$@" ;;
    revive) shift; revive "$@" ;;
    slurm) slurm ;;
    status) status ;;
    down) down ;;
    *) usage; exit 2 ;;
esac
