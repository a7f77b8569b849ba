#!/usr/bin/env bash
# Pipeline benchmarks (issue 3): submit rate, end-to-end throughput, latency and memory, with a
# private RabbitMQ node, a master and two workers on this machine. See docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --locked -q -p gridq-deploy
cargo bench --locked -q -p gridq-deploy --bench pipeline
