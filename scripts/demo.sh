#!/usr/bin/env bash
# The demo: expand the sample training sweep (local-mode runs arrive with the job pipeline).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --locked -q -p gridq-deploy
exec target/release/gridq expand projects/train/sweep.yaml "$@"
