#!/usr/bin/env bash
# The one test command: formatting, lints, then the whole test suite against a real RabbitMQ.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

echo "== cargo fmt --check" >&2
cargo fmt --all --check

echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings

# One private RabbitMQ node for the whole run (each test uses its own vhost). Its
# consumer_timeout is 5 s, so every pipeline test also runs under a tight consumer timeout. It
# also listens with TLS (its own CA) for the TLS tests.
echo "== test broker" >&2
cargo build --locked -q -p gridq-deploy
broker_dir=$(mktemp -d /tmp/gridq-test-broker.XXXXXX)
target/debug/gridq broker --dir "$broker_dir/node" --management --tls --consumer-timeout 5s \
    --env-file "$broker_dir/env" >"$broker_dir/broker.log" 2>&1 &
broker_pid=$!
cleanup() {
    scripts/test-hosts.sh down --dir target/test-hosts >/dev/null 2>&1 || true
    kill "$broker_pid" 2>/dev/null || true
    wait "$broker_pid" 2>/dev/null || true
    rm -rf "$broker_dir"
}
trap cleanup EXIT
export GRIDQ_TEST_BROKER_ENV="$broker_dir/env"

# SSH test hosts for deploy's end-to-end tests (sshd on 127.0.0.2-5, port 2222) and the
# offline images (built from Debian packages, no registry; --verify runs them for real).
echo "== test hosts and images" >&2
hosts_env=$(scripts/test-hosts.sh up --dir target/test-hosts)
export GRIDQ_TEST_HOSTS_ENV="$hosts_env"
scripts/build-images.sh --verify --env-file target/images/images.env
export GRIDQ_TEST_IMAGES_ENV="$PWD/target/images/images.env"

echo "== cargo test" >&2
cargo test --workspace --locked
