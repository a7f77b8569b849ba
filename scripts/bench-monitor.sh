#!/usr/bin/env bash
# Monitor benchmark (issue 4): page and API latency (p50/p99) and master RSS with 1,000,000
# stored jobs. GRIDQ_BENCH_JOBS=N changes the size. See docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --locked -q -p gridq-deploy
cargo bench --locked -q -p gridq-deploy --bench monitor
