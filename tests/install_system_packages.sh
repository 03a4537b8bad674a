#!/bin/bash
# System packages some tests use, and the two loopback "node" names of the multi-node test.
#
#   espeak-ng                  audio demo tests (tests/test_prep_audio.py, test_signal_e2e.py)
#   openssh-server, pdsh       tests/test_launch_cluster.py: clip-launch --hostfile over pdsh/ssh
#   slurm-wlm, munge           tests/test_launch_cluster.py: sbatch / srun on a one-node SLURM
#   clipnode1, clipnode2       /etc/hosts names for 127.0.0.2 and 127.0.0.3 (the ssh "nodes")
#
# Idempotent: what is already there is left alone (no apt-get at all when nothing is missing). It never
# fails the command that runs it: whatever cannot be installed is reported on one line, and the tests
# that need it skip, naming what is missing. `apt-get update` runs only when an install fails (stale or
# absent package lists). No daemon is started or enabled: the tests start their own sshd, munged,
# slurmctld and slurmd as child processes, each with its own config, and stop them.
set -u
export DEBIAN_FRONTEND=noninteractive

# package -> a program it provides (the package counts as installed when that program is there)
PACKAGES=(espeak-ng:espeak-ng openssh-server:sshd pdsh:pdsh slurm-wlm:slurmctld munge:munged)
HOSTS=("127.0.0.2 clipnode1" "127.0.0.3 clipnode2")

note() { echo "install_system_packages: $*"; }

have() { PATH="$PATH:/usr/sbin:/sbin" command -v "$1" >/dev/null 2>&1; }

missing_packages() {
    local entry
    for entry in "${PACKAGES[@]}"; do
        have "${entry#*:}" || printf '%s ' "${entry%%:*}"
    done
}

apt_install() {
    apt-get install -y -q --no-install-recommends "$@" >/tmp/install_system_packages.log 2>&1
}

install_missing() {
    local missing policy="/usr/sbin/policy-rc.d" made_policy=""
    missing=$(missing_packages)
    [ -z "$missing" ] && return 0
    if [ "$(id -u)" != 0 ] || ! have apt-get; then
        note "not root or no apt-get: cannot install ${missing% }; the tests that need them skip"
        return 0
    fi
    # Package scripts must not start sshd/munge/slurm as services (without systemd, invoke-rc.d asks
    # policy-rc.d; 101 = "not allowed"). Only add the guard when the image has none, and remove it after.
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
    fi
    # shellcheck disable=SC2086  # word splitting of the package list is intended
    if ! apt_install $missing; then
        apt-get update -q >/tmp/install_system_packages.update.log 2>&1 || true
        if ! apt_install $missing; then
            local package
            for package in $missing; do  # one at a time, so one broken package does not block the rest
                apt_install "$package" || note "cannot install $package ($(tail -n 1 /tmp/install_system_packages.log))"
            done
        fi
    fi
    [ -n "$made_policy" ] && rm -f "$policy"
    missing=$(missing_packages)
    [ -n "$missing" ] && note "still missing: ${missing% } (see /tmp/install_system_packages.log); the tests that need them skip"
    return 0
}

add_host_names() {
    local line address
    for line in "${HOSTS[@]}"; do
        address=${line%% *}
        # Exact "ADDRESS NAME" lines only, appended (never rewritten: /etc/hosts is often a bind mount).
        grep -Eq "^${address//./\\.}[[:space:]]+${line#* }([[:space:]]|\$)" /etc/hosts 2>/dev/null && continue
        if ! echo "$line" >>/etc/hosts 2>/dev/null; then
            note "cannot add '$line' to /etc/hosts; the multi-node launch test skips"
        fi
    done
}

install_missing
add_host_names
exit 0
