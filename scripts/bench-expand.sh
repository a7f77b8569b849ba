#!/usr/bin/env bash
# Benchmarks sweep expansion on a 1,000,000-job grid (issue targets in brackets):
#   - in-process expansion, jobs/s              [>= 2,000,000]
#   - `gridq expand --format json > /dev/null`  [>= 1,000,000 jobs/s]
#   - peak RSS of that command                  [< 20 MB]
# Measurements, not tests: nothing here fails on a slow machine.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v /usr/bin/time >/dev/null 2>&1 || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq time >/dev/null
}

cargo build --release --locked -q -p gridq-deploy
grid=$(mktemp --suffix=.yaml)
trap 'rm -f "$grid" "$grid.time"' EXIT
cat >"$grid" <<'YAML'
name: bench
command: python train.py {args}
max_jobs: 1000000
parameters:
  lr: {geomspace: [1e-5, 1e-1, 10]}
  epochs: !!python/tuple [1, 101, 1]
  batch_size: [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
  seed: {range: [0, 100]}
  model: resnet18
YAML

cargo bench --locked -q -p gridq-master --bench expand 2>/dev/null | grep jobs/s

for format in json text; do
    best=""
    rss=0
    for _ in 1 2 3 4 5; do
        /usr/bin/time -o "$grid.time" -f '%e %M' target/release/gridq expand "$grid" --format "$format" >/dev/null 2>&1
        out=$(tail -1 "$grid.time")
        secs=${out% *}
        kb=${out#* }
        if [ -z "$best" ] || awk "BEGIN{exit !($secs < $best)}"; then best=$secs; fi
        ((kb > rss)) && rss=$kb
    done
    awk -v s="$best" -v r="$rss" -v f="$format" \
        'BEGIN{printf "gridq expand --format %s > /dev/null: best of 5 %.2f s = %.0f jobs/s, peak RSS %.1f MB\n", f, s, 1000000/s, r/1024}'
done
echo "gridq expand --format count: $(target/release/gridq expand "$grid" --format count) jobs"
