#!/usr/bin/env bash
# What a deploy costs on the sshd test hosts (scripts/test-hosts.sh): bytes sent per host and
# wall time for a first deploy, a redeploy with nothing changed, and a gridq upgrade (another
# binary), then the time of a first and a second `gridq pull` of a finished sweep.
#
#   scripts/bench-deploy.sh [--binary PATH]   # default: scripts/release.sh's binary
#
# The test hosts share this machine's Docker engine, so an image is never really sent between
# them: the cost of sending the project's image once to a host that lacks it is printed from
# the size of its `docker save` stream instead. Needs the test hosts, the offline images
# (scripts/build-images.sh --env-file target/images/images.env) and a static binary.
set -euo pipefail
cd "$(dirname "$0")/.."

binary=""
while (($#)); do
    case "$1" in
    --binary) binary=${2:?--binary needs a path}; shift ;;
    *) echo "bench-deploy: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
[ -n "$binary" ] || binary=$(scripts/release.sh | tail -n1)
cargo build --locked -q -p gridq-deploy
gridq=$PWD/target/debug/gridq
hosts_env=$(scripts/test-hosts.sh up --dir target/test-hosts)
# KEY=VALUE files whose values may hold spaces: read, never sourced.
get() { sed -n "s/^$2=//p" "$1" | head -n1; }
key=$(get "$hosts_env" GRIDQ_TEST_SSH_KEY)
known=$(get "$hosts_env" GRIDQ_TEST_SSH_KNOWN_HOSTS)
hosts=$(get "$hosts_env" GRIDQ_TEST_HOSTS | tr ' ' ',')
user_image=$(get target/images/images.env GRIDQ_USER_IMAGE)
rabbitmq_image=$(get target/images/images.env GRIDQ_RABBITMQ_IMAGE)

name="bench-deploy-$$"
work=$(mktemp -d /tmp/gridq-bench-deploy.XXXXXX)
project="$work/project"
cp -r projects/echo "$project"
cat >"$project/outputs.yaml" <<'EOF'
name: outputs
command: [python3, -c, "import os; d = os.environ['GRIDQ_OUTPUT']; [open(os.path.join(d, 'part-%d.txt' % i), 'w').write('x' * 100000) for i in range(5)]"]
parameters:
  n: !!python/tuple [0, 30]
EOF
port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
export GRIDQ_CONTEXT="$work/context.json"
cleanup() {
    (cd "$project" && "$gridq" clean --purge --yes >/dev/null 2>&1) || true
    rm -rf "$work"
}
trap cleanup EXIT

now() { date +%s.%N; }
took() { python3 -c "print(f'{$2 - $1:.1f} s')"; }
sent_lines() { grep -E '^  .*: sent ' "$1" | sed 's/^  /    /'; }

common=(-i "$key" --known-hosts "$known" --ssh-config none
    -d "$project" --name "$name" --slots 2 --broker-port "$(port)" --management-port "$(port)"
    --monitor-port "$(port)" --worker-image "$user_image" --broker-image "$rabbitmq_image")

echo "binary: $binary ($(du -m "$binary" | cut -f1) MiB)"
echo "the worker image, as deploy would send it to a host without it: $user_image, $(docker save "$user_image" | wc -c | awk '{printf "%.1f MiB", $1 / 1048576}')"

t0=$(now)
"$gridq" deploy -a "$hosts" -m 1 -w 1,2,3 "${common[@]}" --gridq-binary "$binary" >"$work/first.out" 2>"$work/first.err" ||
    { cat "$work/first.out" "$work/first.err" >&2; exit 1; }
t1=$(now)
echo "first deploy, 3 hosts: $(took "$t0" "$t1")"
sent_lines "$work/first.out"

t0=$(now)
"$gridq" deploy -f -d "$project" >"$work/again.out" 2>"$work/again.err" ||
    { cat "$work/again.out" "$work/again.err" >&2; exit 1; }
t1=$(now)
echo "redeploy, nothing changed: $(took "$t0" "$t1")"
sent_lines "$work/again.out"

cp "$binary" "$work/gridq-upgraded"
printf '\0upgrade' >>"$work/gridq-upgraded"
t0=$(now)
"$gridq" deploy -f -d "$project" --gridq-binary "$work/gridq-upgraded" >"$work/up.out" 2>"$work/up.err" ||
    { cat "$work/up.out" "$work/up.err" >&2; exit 1; }
t1=$(now)
echo "upgrade (a new binary; master and workers replaced): $(took "$t0" "$t1")"
sent_lines "$work/up.out"

cd "$project"
"$gridq" submit outputs.yaml --watch >/dev/null
t0=$(now)
"$gridq" pull outputs --dest "$work/pulled" >"$work/pull1.out" 2>&1 || { cat "$work/pull1.out" >&2; exit 1; }
t1=$(now)
"$gridq" pull outputs --dest "$work/pulled" >"$work/pull2.out" 2>&1 || { cat "$work/pull2.out" >&2; exit 1; }
t2=$(now)
files=$(find "$work/pulled/outputs" -name 'part-*.txt' | wc -l)
echo "gridq pull of 30 jobs x 5 files ($files files, $(du -sm "$work/pulled" | cut -f1) MiB) from 3 hosts: first $(took "$t0" "$t1"), second (nothing new) $(took "$t1" "$t2")"
sed 's/^/    /' "$work/pull2.out"
