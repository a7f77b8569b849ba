#!/usr/bin/env bash
# The main job: run the sample training sweep in local mode (installs RabbitMQ if absent; starts
# a private broker node when none answers on 127.0.0.1:5672) and print the results table.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --locked -q -p gridq-deploy
exec target/release/gridq run projects/train/sweep.yaml --local "$@"
