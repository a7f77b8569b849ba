#!/usr/bin/env bash
# SSH "hosts" for the end-to-end tests of `gridq deploy`: one private sshd per host, each on
# its own loopback address, for its own Unix user, with key-only logins.
#
#   h1        gridq-h1@127.0.0.2        in the docker group (uses this machine's Docker engine)
#   h2        gridq-h2@127.0.0.3        in the docker group
#   h3        gridq-h3@127.0.0.4        in the docker group
#   nodocker  gridq-nodocker@127.0.0.5  NOT in the docker group: the error case
#
# All listen on port 2222 (--port), not 22: a system sshd listening on 0.0.0.0:22 would make
# binding 127.0.0.x:22 fail. The state directory (--dir, default target/test-hosts) holds the
# client key pair (id_ed25519), known_hosts, an ssh_config, one directory per host (config,
# host key, pid file, log) and the description of the hosts: hosts.env (KEY=VALUE, what
# GRIDQ_TEST_HOSTS_ENV names) and hosts.json. The users, their homes (/home/USER) and their
# authorized_keys are machine-wide, so one state directory at a time.
#
#   scripts/test-hosts.sh up [--dir DIR] [--port N]   start (idempotent), print the env file path
#   scripts/test-hosts.sh status [--dir DIR]          show each host; exit 1 if one is not up
#   scripts/test-hosts.sh down [--dir DIR] [--purge]  stop them; --purge also deletes the users
#
# Needs root (users, groups, sshd), openssh-server and openssh-client (scripts/setup.sh).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

action=${1:-}
[ -n "$action" ] || { usage >&2; exit 2; }
shift
dir="${CARGO_TARGET_DIR:-$repo/target}/test-hosts"
port=""
purge=0
while (($#)); do
    case $1 in
    --dir) dir=${2:?--dir needs a path}; shift ;;
    --port) port=${2:?--port needs a number}; shift ;;
    --purge) purge=1 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "test-hosts: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
case $action in up | down | status) ;; -h | --help) usage; exit 0 ;; *) usage >&2; exit 2 ;; esac

log() { echo "test-hosts: $*" >&2; }
die() { log "error: $*"; exit 1; }

# name address user docker-group(1/0)
hosts=(
    "h1 127.0.0.2 gridq-h1 1"
    "h2 127.0.0.3 gridq-h2 1"
    "h3 127.0.0.4 gridq-h3 1"
    "nodocker 127.0.0.5 gridq-nodocker 0"
)
sshd=/usr/sbin/sshd
socket=/var/run/docker.sock

[ "$action" != up ] || mkdir -p "$dir"
dir=$(realpath -m "$dir")
# status and down use the port that up chose.
if [ -z "$port" ]; then
    port=2222
    if [ "$action" != up ] && [ -s "$dir/port" ]; then port=$(cat "$dir/port"); fi
fi
key="$dir/id_ed25519"
known_hosts="$dir/known_hosts"

# The pid of the sshd serving host NAME from this state directory, or nothing.
instance_pid() {
    local pidfile="$dir/$1/sshd.pid" pid
    [ -s "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    # A pid file can outlive its process and the pid be reused: check it is our sshd.
    if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "-f $dir/$1/sshd_config"; then
        echo "$pid"
    fi
}

# Whether an SSH server answers on ADDRESS:PORT (its banner starts with SSH-).
answers() {
    # shellcheck disable=SC2016 # $0 and $1 belong to the inner bash
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1" && head -c 4 <&3' "$1" "$2" 2>/dev/null | grep -q '^SSH-'
}

wait_until_answers() {
    # shellcheck disable=SC2016 # $0 and $1 belong to the inner bash
    local addr=$1 name=$2 deadline=$((SECONDS + 15))
    until answers "$addr" "$port"; do
        if ((SECONDS >= deadline)); then
            log "sshd for $name did not answer on $addr:$port within 15s; its log:"
            tail -n 20 "$dir/$name/sshd.log" >&2 || true
            return 1
        fi
        sleep 0.1
    done
}

stop_instance() {
    local name=$1 pid deadline
    pid=$(instance_pid "$name")
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 10))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.1
    done
    rm -f "$dir/$name/sshd.pid"
}

ssh_to() {
    local addr=$1 user=$2
    shift 2
    ssh -i "$key" -o IdentitiesOnly=yes -o BatchMode=yes -o "UserKnownHostsFile=$known_hosts" \
        -o StrictHostKeyChecking=yes -o ConnectTimeout=5 -p "$port" -l "$user" "$addr" "$@"
}

ensure_user() {
    local user=$1 docker=$2
    if ! id "$user" >/dev/null 2>&1; then
        useradd --create-home --home-dir "/home/$user" --shell /bin/bash --user-group "$user"
    fi
    # '*': no password login, but not "locked" ('!'), which sshd refuses even for keys.
    usermod --password '*' "$user"
    if ((docker)); then
        usermod --append --groups docker "$user"
    elif id -nG "$user" | tr ' ' '\n' | grep -qx docker; then
        gpasswd --delete "$user" docker >/dev/null
    fi
    local home
    home=$(getent passwd "$user" | cut -d: -f6)
    install -d -o "$user" -g "$user" -m 0700 "$home/.ssh"
    install -o "$user" -g "$user" -m 0600 "$key.pub" "$home/.ssh/authorized_keys"
}

write_config() {
    local name=$1 addr=$2 user=$3
    cat >"$dir/$name/sshd_config.new" <<EOF
# sshd of the gridq test host $name ($user@$addr:$port); written by scripts/test-hosts.sh
Port $port
ListenAddress $addr
HostKey $dir/$name/ssh_host_ed25519_key
PidFile $dir/$name/sshd.pid
AllowUsers $user
AuthorizedKeysFile .ssh/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
UsePAM no
StrictModes yes
AllowTcpForwarding yes
AllowStreamLocalForwarding yes
X11Forwarding no
PrintMotd no
# Tests open many sessions at once; the defaults (10:30:100, 10) would drop some.
MaxStartups 200
MaxSessions 100
LoginGraceTime 30
LogLevel VERBOSE
Subsystem sftp internal-sftp
EOF
    mv "$dir/$name/sshd_config.new" "$dir/$name/sshd_config"
}

write_description() {
    local env="$dir/hosts.env" json="$dir/hosts.json" cfg="$dir/ssh_config"
    local name addr user docker list="" sep="" entries=""
    : >"$cfg.new"
    for h in "${hosts[@]}"; do
        read -r name addr user docker <<<"$h"
        if ((docker)); then
            list+="${list:+ }$user@$addr:$port"
        fi
        entries+="$sep    {\"name\": \"$name\", \"addr\": \"$addr\", \"port\": $port, \"user\": \"$user\", \"docker\": $([ "$docker" = 1 ] && echo true || echo false)}"
        sep=$',\n'
        cat >>"$cfg.new" <<EOF
Host $name
    HostName $addr
    Port $port
    User $user
    IdentityFile $key
    IdentitiesOnly yes
    UserKnownHostsFile $known_hosts
    StrictHostKeyChecking yes
    BatchMode yes

EOF
    done
    mv "$cfg.new" "$cfg"
    cat >"$json.new" <<EOF
{
  "key": "$key",
  "known_hosts": "$known_hosts",
  "ssh_config": "$cfg",
  "hosts": [
$entries
  ]
}
EOF
    mv "$json.new" "$json"
    cat >"$env.new" <<EOF
GRIDQ_TEST_HOSTS_DIR=$dir
GRIDQ_TEST_SSH_KEY=$key
GRIDQ_TEST_SSH_KNOWN_HOSTS=$known_hosts
GRIDQ_TEST_SSH_CONFIG=$cfg
GRIDQ_TEST_HOSTS_JSON=$json
GRIDQ_TEST_SSH_PORT=$port
GRIDQ_TEST_HOSTS=$list
GRIDQ_TEST_HOST_NODOCKER=gridq-nodocker@127.0.0.5:$port
EOF
    # Written last and renamed into place: its presence means the hosts are up.
    mv "$env.new" "$env"
}

up() {
    [ "$(id -u)" -eq 0 ] || die "needs root (it creates users and runs sshd)"
    [ -x "$sshd" ] || die "no $sshd (scripts/setup.sh installs openssh-server)"
    command -v ssh-keygen >/dev/null 2>&1 || die "no ssh-keygen (openssh-client)"
    rm -f "$dir/hosts.env"

    # Docker access is by group: the socket belongs to group docker, read-write for it.
    getent group docker >/dev/null || groupadd --system docker
    if [ -S "$socket" ]; then
        [ "$(stat -c %G "$socket")" = docker ] || chgrp docker "$socket"
        chmod g+rw "$socket"
        if [ "$(($(stat -c '%#a' "$socket") & 6))" -ne 0 ]; then
            log "warning: $socket is world-accessible; the nodocker host will reach Docker too"
        fi
    else
        log "warning: no Docker socket at $socket"
    fi

    [ -s "$key" ] || ssh-keygen -q -t ed25519 -N '' -C "gridq-test-client" -f "$key"
    install -d -m 0755 /run/sshd # sshd's privilege separation directory

    local name addr user docker pid known=""
    for h in "${hosts[@]}"; do
        read -r name addr user docker <<<"$h"
        ensure_user "$user" "$docker"
        install -d -m 0700 "$dir/$name"
        [ -s "$dir/$name/ssh_host_ed25519_key" ] ||
            ssh-keygen -q -t ed25519 -N '' -C "gridq-test-$name" -f "$dir/$name/ssh_host_ed25519_key"
        known+="[$addr]:$port $(cut -d' ' -f1,2 "$dir/$name/ssh_host_ed25519_key.pub")"$'\n'
        local before=""
        [ -f "$dir/$name/sshd_config" ] && before=$(cat "$dir/$name/sshd_config")
        write_config "$name" "$addr" "$user"
        pid=$(instance_pid "$name")
        if [ -n "$pid" ] && [ "$before" = "$(cat "$dir/$name/sshd_config")" ] && answers "$addr" "$port"; then
            continue
        fi
        stop_instance "$name"
        "$sshd" -t -f "$dir/$name/sshd_config" || die "sshd rejects $dir/$name/sshd_config"
        "$sshd" -f "$dir/$name/sshd_config" -E "$dir/$name/sshd.log" ||
            die "sshd for $name did not start (is $addr:$port taken?); see $dir/$name/sshd.log"
        log "started sshd for $user@$addr:$port"
    done
    # Renamed into place: an ssh running meanwhile never sees a half-written file.
    printf '%s' "$known" >"$known_hosts.new"
    mv "$known_hosts.new" "$known_hosts"
    echo "$port" >"$dir/port"
    for h in "${hosts[@]}"; do
        read -r name addr user docker <<<"$h"
        wait_until_answers "$addr" "$name" || die "host $name is not up"
        [ -n "$(instance_pid "$name")" ] || die "sshd for $name answers but is not ours (another server on $addr:$port?)"
    done
    write_description
    echo "$dir/hosts.env"
}

status() {
    local name addr user docker pid ok=0
    for h in "${hosts[@]}"; do
        read -r name addr user docker <<<"$h"
        pid=$(instance_pid "$name")
        if [ -z "$pid" ]; then
            printf '%-9s %-30s stopped\n' "$name" "$user@$addr:$port"
            ok=1
        elif got=$(ssh_to "$addr" "$user" id -un 2>&1) && [ "$got" = "$user" ]; then
            printf '%-9s %-30s up (pid %s)\n' "$name" "$user@$addr:$port" "$pid"
        else
            printf '%-9s %-30s running (pid %s) but login fails: %s\n' "$name" "$user@$addr:$port" "$pid" "$got"
            ok=1
        fi
    done
    return "$ok"
}

down() {
    local name addr user docker
    rm -f "$dir/hosts.env"
    for h in "${hosts[@]}"; do
        read -r name addr user docker <<<"$h"
        stop_instance "$name"
        if ((purge)) && id "$user" >/dev/null 2>&1; then
            [ "$(id -u)" -eq 0 ] || die "--purge needs root"
            # userdel refuses while the user has processes; there should be none left.
            userdel --remove "$user" 2>/dev/null || log "warning: could not delete user $user"
        fi
    done
    if ((purge)); then
        rm -rf "$dir"
    fi
}

"$action"
