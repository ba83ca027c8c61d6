# Sourced by tools/setup_env.sh (it uses its say and die): the Debian packages the hosts of
# tools/cluster.sh need, installed as root, never started here.
#
# The multi-host tests' hosts (tools/cluster.sh) run Debian's sshd, munged, slurmctld and
# slurmd in network namespaces, started by tools/cluster.sh alone. As root they are installed
# without being started (a policy-rc.d that refuses every service start keeps them off this
# machine's own network during the install) and without starting at boot: Debian's packages
# enable their services, which set-up disables again, and openssh-server's host keys, made
# in /etc/ssh by the install, are removed (the cluster's hosts use keys of their own).
CLUSTER_PACKAGES=(openssh-server slurm-wlm munge iproute2)
CLUSTER_SERVICES=(ssh munge slurmd slurmctld)

no_boot_services() {  # the cluster packages' services: enabled at no runlevel or target
    local s
    for s in "${CLUSTER_SERVICES[@]}"; do
        if command -v systemctl >/dev/null; then  # unit files and SysV links, offline too
            if [[ "$(systemctl is-enabled "$s.service" 2>/dev/null)" == enabled ]]; then
                systemctl disable --quiet "$s.service" >/dev/null 2>&1 || true
            fi
        elif [[ -e /etc/init.d/$s ]] && compgen -G "/etc/rc[2-5].d/S*$s" >/dev/null; then
            update-rc.d "$s" disable >/dev/null 2>&1 || true
        fi
    done
    return 0
}

cluster_tools() {
    if [[ -x /usr/sbin/sshd && -x /usr/sbin/slurmd && -x /usr/sbin/munged ]] \
            && command -v ip >/dev/null; then
        if [[ "$(id -u)" == 0 ]]; then no_boot_services; fi
        return 0
    fi
    if [[ "${LARS_TF_SKIP_APT:-0}" != 1 && "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
        say "installing Debian's ${CLUSTER_PACKAGES[*]} (the hosts of tools/cluster.sh; not started, not at boot)"
        local guard="" keys_before
        keys_before="$(compgen -G '/etc/ssh/ssh_host_*' || true)"
        if [[ ! -e /usr/sbin/policy-rc.d ]]; then
            printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
            chmod +x /usr/sbin/policy-rc.d
            guard=1
        fi
        local rc=0
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            "${CLUSTER_PACKAGES[@]}" >/dev/null 2>&1 || {
            apt-get update -q >/dev/null 2>&1 || true
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
                "${CLUSTER_PACKAGES[@]}" >/dev/null || rc=$?
        }
        [[ -n "$guard" ]] && rm -f /usr/sbin/policy-rc.d
        [[ $rc -eq 0 ]] || die "apt-get install ${CLUSTER_PACKAGES[*]} failed"
        no_boot_services
        local key
        for key in /etc/ssh/ssh_host_*; do  # the ones this install made
            [[ -e "$key" ]] && ! grep -qxF "$key" <<<"$keys_before" && rm -f "$key"
        done
        return 0
    fi
    say "not installing ${CLUSTER_PACKAGES[*]} (needs root and apt): the multi-host tests (tests/test_cluster.py, root only) need them"
}

