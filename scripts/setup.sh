#!/usr/bin/env bash
# Installs what gridq's build, demo and tests need on a fresh Debian machine. Idempotent: it
# only calls apt-get when something is missing. Run as root (or with sudo available).
set -euo pipefail

need=()
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v cc >/dev/null 2>&1 || need+=(gcc)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
# RabbitMQ: the broker of local mode and of the tests (gridq starts private nodes itself).
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || command -v rabbitmq-server >/dev/null 2>&1 || need+=(rabbitmq-server)

if ((${#need[@]})); then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "setup: installing ${need[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    # Debian starts a system node on install where it can; gridq runs its own nodes.
    if command -v service >/dev/null 2>&1 && [[ " ${need[*]} " == *" rabbitmq-server "* ]]; then
        $sudo service rabbitmq-server stop >/dev/null 2>&1 || true
    fi
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: cargo is not on PATH; install a Rust toolchain (rustup) first" >&2
    exit 1
fi
