#!/usr/bin/env bash
# Installs what gridq's build, demo and tests need on a fresh Debian machine. Idempotent: it
# only calls apt-get when something is missing. Run as root (or with sudo available).
set -euo pipefail

need=()
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v cc >/dev/null 2>&1 || need+=(gcc)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
command -v curl >/dev/null 2>&1 || need+=(curl)
# RabbitMQ: the broker of local mode and of the tests (gridq starts private nodes itself).
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || command -v rabbitmq-server >/dev/null 2>&1 || need+=(rabbitmq-server)
# SSH test hosts (scripts/test-hosts.sh runs private sshd instances) and file sync for deploy.
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
command -v rsync >/dev/null 2>&1 || need+=(rsync)
# Offline images (scripts/build-images.sh): Debian roots made by mmdebstrap, no registry.
command -v mmdebstrap >/dev/null 2>&1 || need+=(mmdebstrap)
command -v gpg >/dev/null 2>&1 || need+=(gpg) # mmdebstrap checks the archive keyring with it
[ -e /usr/share/keyrings/debian-archive-keyring.gpg ] || need+=(debian-archive-keyring)
# The web monitor's browser tests.
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)

if ((${#need[@]})); then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "setup: installing ${need[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    # Debian starts system daemons on install where it can. gridq runs its own broker nodes and
    # the tests run their own sshd instances, so stop the system ones and keep them off.
    stop_service() {
        if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
            $sudo systemctl disable --now "$@" >/dev/null 2>&1 || true
        elif command -v service >/dev/null 2>&1; then
            $sudo service "$1" stop >/dev/null 2>&1 || true
        fi
    }
    [[ " ${need[*]} " != *" rabbitmq-server "* ]] || stop_service rabbitmq-server
    [[ " ${need[*]} " != *" openssh-server "* ]] || stop_service ssh ssh.socket
fi

if ! command -v docker >/dev/null 2>&1; then
    echo "setup: warning: no docker CLI; gridq deploy, its tests and scripts/build-images.sh need one" >&2
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: cargo is not on PATH; install a Rust toolchain (rustup) first" >&2
    exit 1
fi
