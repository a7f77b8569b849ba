#!/usr/bin/env bash
# Builds the portable gridq: one statically linked x86_64 Linux binary (no dynamic libc, no
# interpreter), which runs on any distribution and in any image, and a tarball of it.
#
#   scripts/release.sh            # optimised: target/dist/gridq and
#                                 #   target/dist/gridq-VERSION-x86_64-linux.tar.gz
#   scripts/release.sh --debug    # unoptimised, quicker to build (the tests use it), in
#                                 #   target/dist/debug/
#
# The last line of output is the binary's path. CARGO_TARGET_DIR is honoured.
#
# How: glibc's static libraries (`-C target-feature=+crt-static` on the x86_64-unknown-linux-gnu
# target, which Debian's libc6-dev provides), with an explicit --target so that build scripts and
# proc macros stay dynamic. Why not musl: its Rust standard library is another rustup component
# and its C compiler another package, while the static glibc needs nothing beyond the toolchain
# that builds gridq anyway; glibc's allocator also serves the master's SQLite-heavy core better
# than musl's. glibc's name lookup in a static binary: since glibc 2.34 the `files` and `dns`
# sources are part of libc itself, so /etc/hosts and DNS work in an image with no libc at all
# (the tests resolve a name from /etc/hosts in an empty image); user names are never looked up
# (gridq takes numeric uid:gid).
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
dir=release
while (($#)); do
    case "$1" in
    --debug) profile=dev dir=debug ;;
    -h | --help)
        sed -n '2,9p' "$0"
        exit 0
        ;;
    *)
        echo "release.sh: unknown option $1" >&2
        exit 2
        ;;
    esac
    shift
done

target=x86_64-unknown-linux-gnu
target_dir=${CARGO_TARGET_DIR:-$PWD/target}
RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --locked -q -p gridq-deploy --bin gridq --target "$target" --profile "$profile"
bin="$target_dir/$target/$dir/gridq"

# Static means no program interpreter and no needed libraries.
if readelf -l "$bin" | grep -q 'Requesting program interpreter' ||
    readelf -d "$bin" 2>/dev/null | grep -q '(NEEDED)'; then
    echo "release.sh: $bin is not statically linked" >&2
    exit 1
fi

version=$("$bin" --version | awk '{print $2}')
out="$target_dir/dist"
[ "$profile" = release ] || out="$target_dir/dist/debug"
mkdir -p "$out"
name="gridq-$version-x86_64-linux"
# The shipped copy keeps its symbols (for backtraces) but not the debug info.
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir "$stage/$name"
objcopy --strip-debug "$bin" "$stage/$name/gridq"
cp README.md "$stage/$name/"
tar -C "$stage" -czf "$out/$name.tar.gz" "$name"
cp "$stage/$name/gridq" "$out/gridq.tmp" && mv "$out/gridq.tmp" "$out/gridq"
echo "release.sh: $out/$name.tar.gz" >&2
echo "$out/gridq"
