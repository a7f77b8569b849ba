#!/usr/bin/env bash
# Pipeline benchmarks (issue 3): submit rate, end-to-end throughput, latency and memory, with a
# private RabbitMQ node, a master and two workers on this machine. See docs/benchmarks.md.
#
# The bench binary is run directly, not through `cargo bench`: the workers and their jobs
# inherit its environment, and cargo adds LD_LIBRARY_PATH (its target directories) for the
# programs it runs. Every `true` job would then look for libc in those directories first,
# which made each job cost 0.91 ms of CPU instead of 0.72 ms here.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --locked -q -p gridq-deploy
bench=$(cargo bench --locked --no-run -p gridq-deploy --bench pipeline 2>&1 |
    sed -n 's/^ *Executable .*(\(.*\))$/\1/p' | tail -1)
if [ -z "$bench" ] || [ ! -x "$bench" ]; then
    echo "bench: cannot find the pipeline bench executable" >&2
    exit 1
fi
exec "$bench" --bench
