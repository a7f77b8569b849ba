#!/usr/bin/env bash
# Builds the static gridq binary and the container images of the tests and of hosts with no
# registry, without any registry: Debian roots made by mmdebstrap and loaded with `docker
# import`, and the small Dockerfiles of docker/. Idempotent: every image is tagged with a hash
# of its inputs and skipped when that tag exists, and the roots are cached as tarballs under
# target/images/ (keyed by a hash of their package lists).
#
#   gridq-python:SUITE           minbase + ca-certificates, python3, procps: a stand-in for a
#                                team's own image (no gridq in it); the tests' workers run in it
#   gridq:VERSION-HASH           the static gridq binary alone on an empty base, with the CA
#                                certificates and a `gridq` user                   (+ :local)
#   gridq-rabbitmq:VERSION-HASH  rabbitmq-server + management, own mmdebstrap root (+ :local)
#
# `gridq deploy` needs none of the first two: it mounts the static binary into the project's
# own image, and makes the master's tiny runtime image itself. The binary is
# scripts/release.sh's (--debug by default here), stripped of its debug info.
#
# See docs/images.md. Needs root (mmdebstrap's root mode), docker and mmdebstrap
# (scripts/setup.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
    cat <<'EOF'
usage: scripts/build-images.sh [options]

  --debug | --release   which static gridq binary to build (scripts/release.sh; default: --debug)
  --binary PATH         use this static gridq binary instead of building one
  --no-strip            keep the binary's debug info (default: strip it)
  --only LIST           comma-separated subset of python,gridq,rabbitmq (default: all)
  --suite NAME          Debian release of the roots (default: the host's, else bookworm)
  --env-file PATH       write GRIDQ_BINARY=..., GRIDQ_IMAGE=..., GRIDQ_USER_IMAGE=...,
                        GRIDQ_RABBITMQ_IMAGE=...
  --verify              then run the images for real: a broker with a generated user, the
                        AMQP handshake, the management API, the echo sweep in the python
                        image with the static binary mounted, gridq in its empty image
  --rebuild             ignore the cached roots and existing tags
EOF
}

profile=debug
binary=""
strip=1
only="python,gridq,rabbitmq"
suite=""
env_file=""
verify=0
rebuild=0
while (($#)); do
    case $1 in
    --debug) profile=debug ;;
    --release) profile=release ;;
    --binary) binary=${2:?--binary needs a path}; shift ;;
    --no-strip) strip=0 ;;
    --only) only=${2:?--only needs a list}; shift ;;
    --suite) suite=${2:?--suite needs a name}; shift ;;
    --env-file) env_file=${2:?--env-file needs a path}; shift ;;
    --verify) verify=1 ;;
    --rebuild) rebuild=1 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "build-images: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

log() { echo "build-images: $*" >&2; }
die() { log "error: $*"; exit 1; }
wants() { [[ ",$only," == *",$1,"* ]]; }
for part in ${only//,/ }; do
    case $part in python | gridq | rabbitmq) ;; *) die "unknown image '$part' in --only" ;; esac
done

command -v docker >/dev/null 2>&1 || die "no docker CLI"
docker info >/dev/null 2>&1 || die "the Docker engine does not answer (docker info)"

# The roots follow the host's Debian release (what mmdebstrap fetches best from its mirror).
if [ -z "$suite" ]; then
    suite=bookworm
    if [ -r /etc/os-release ] && grep -qx 'ID=debian' /etc/os-release; then
        # shellcheck disable=SC1091
        suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
    fi
fi
version=$(sed -n '/^\[workspace\.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
[ -n "$version" ] || die "no version in [workspace.package] of Cargo.toml"
cache="${CARGO_TARGET_DIR:-target}/images"
mkdir -p "$cache"

work=$(mktemp -d /tmp/gridq-images.XXXXXX)
cleanup_steps=()
cleanup() {
    local step
    for step in "${cleanup_steps[@]}"; do eval "$step" || true; done
    rm -rf "$work"
}
trap cleanup EXIT

key_of() { sha256sum | cut -c1-12; }
has_image() { [ "$rebuild" -eq 0 ] && docker image inspect "$1" >/dev/null 2>&1; }
image_id() { docker image inspect --format '{{.Id}}' "$1"; }
elapsed() { echo "$((SECONDS - $1))s"; }

# prune REPO KEEP PATTERN [LABEL=VALUE]: untags the images REPO:PATTERN other than KEEP, so
# that rebuilds do not pile up (an image still used by a container stays).
prune() {
    local repo=$1 keep=$2 pattern=$3 label=${4:-} ref
    local filters=(--filter "reference=$repo:$pattern")
    [ -z "$label" ] || filters+=(--filter "label=$label")
    docker image ls --format '{{.Repository}}:{{.Tag}}' "${filters[@]}" | while read -r ref; do
        [ "$ref" = "$keep" ] || docker rmi "$ref" >/dev/null 2>&1 || true
    done
}

# --- Debian roots -------------------------------------------------------------------------

# Settings of the host's apt that the download needs too (a mirror that serves an older
# snapshot, a proxy). They apply to the build only: the hook below drops them from the image.
apt-config dump 2>/dev/null | grep -E '^Acquire::(Check-Valid-Until|Check-Date|https?::Proxy)' \
    >"$work/host-apt.conf" || true
# The hooks' "$1" is the root directory, expanded by mmdebstrap's shell, not this one.
# shellcheck disable=SC2016
mm_args=(
    --variant=minbase
    # merged /usr by the usr-is-merged package, not usrmerge (which drags in all of perl)
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
    --aptopt='APT::Install-Recommends "false"'
    --dpkgopt='path-exclude=/usr/share/man/*'
    --dpkgopt='path-exclude=/usr/share/info/*'
    --dpkgopt='path-exclude=/usr/share/locale/*'
    --dpkgopt='path-exclude=/usr/share/doc/*'
    --dpkgopt='path-include=/usr/share/doc/*/copyright'
    --customize-hook='rm -f "$1/etc/apt/apt.conf.d/99mmdebstrap"'
)
python_packages=(ca-certificates python3 procps)
rabbitmq_packages=(ca-certificates python3 procps tini rabbitmq-server)
# Nothing node-specific may ship in the image: each container makes its own Erlang cookie and
# database on its volume, and the plugins come from docker/rabbitmq.
# shellcheck disable=SC2016
rabbitmq_hooks=(
    --customize-hook='rm -rf "$1/var/lib/rabbitmq/.erlang.cookie" "$1/var/lib/rabbitmq/mnesia" "$1/etc/rabbitmq/enabled_plugins"'
)
import_changes=(
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
    --change 'ENV LANG=C.UTF-8'
    --change 'LABEL gridq.image=1'
    --change 'CMD ["/bin/bash"]'
)

# build_root NAME PACKAGES... [-- EXTRA_MMDEBSTRAP_ARGS...]: makes the image NAME:SUITE from
# a minbase root holding PACKAGES, reusing the cached tarball and image when the inputs match.
build_root() {
    local name=$1
    shift
    local packages=() extra=()
    while (($#)) && [ "$1" != -- ]; do packages+=("$1"); shift; done
    (($#)) && shift
    extra=("$@")
    local key
    key=$(printf '%s\n' root-v1 "$suite" "${mm_args[@]}" "${packages[@]}" "${extra[@]}" \
        "${import_changes[@]}" | key_of)
    local tag="$name:$suite-$key" tar="$cache/$name-$suite-$key.tar"
    if has_image "$tag"; then
        log "$tag is up to date"
    else
        if [ "$rebuild" -eq 1 ] || [ ! -s "$tar" ]; then
            command -v mmdebstrap >/dev/null 2>&1 || die "no mmdebstrap (scripts/setup.sh installs it)"
            [ "$(id -u)" -eq 0 ] || die "mmdebstrap's root mode needs root"
            local t0=$SECONDS
            log "mmdebstrap $suite for $name: ${packages[*]}"
            local list
            list=$(
                IFS=,
                echo "${packages[*]}"
            )
            if ! mmdebstrap --mode=root --format=tar --quiet "${mm_args[@]}" \
                --aptopt="$work/host-apt.conf" --include="$list" "${extra[@]}" \
                "$suite" "$tar.partial" >"$work/mmdebstrap.log" 2>&1; then
                cat "$work/mmdebstrap.log" >&2
                rm -f "$tar.partial"
                die "mmdebstrap failed for $name"
            fi
            mv "$tar.partial" "$tar"
            # Only the current root of each image is kept.
            find "$cache" -maxdepth 1 -name "$name-$suite-*.tar" ! -path "$tar" -delete
            log "root of $name: $(du -m "$tar" | cut -f1) MiB in $(elapsed "$t0")"
        fi
        local t1=$SECONDS
        docker import "${import_changes[@]}" --message "gridq $name root ($suite, ${packages[*]})" \
            "$tar" "$tag" >/dev/null
        log "imported $tag in $(elapsed "$t1")"
    fi
    docker tag "$tag" "$name:$suite"
    prune "$name" "$tag" "$suite-*"
}

# --- Dockerfile images --------------------------------------------------------------------

# docker_build TAG CONTEXT [BUILD ARGS...]: the legacy builder (the engine may have no
# BuildKit), output kept in a log that is shown on failure.
docker_build() {
    local tag=$1 ctx=$2
    shift 2
    local t0=$SECONDS
    if ! DOCKER_BUILDKIT=0 docker build --force-rm --tag "$tag" "$@" "$ctx" \
        >"$work/build.log" 2>&1; then
        cat "$work/build.log" >&2
        die "docker build of $tag failed"
    fi
    log "built $tag in $(elapsed "$t0")"
}

# The static gridq binary, stripped of debug info unless --no-strip, in $cache/gridq (kept:
# the env file names it for the tests and for deploy's --gridq-binary).
binary_ready=0
prepare_binary() {
    ((binary_ready)) && return
    if [ -z "$binary" ]; then
        local flags=()
        [ "$profile" = release ] || flags+=(--debug)
        log "scripts/release.sh ${flags[*]}"
        binary=$(scripts/release.sh "${flags[@]}" | tail -n1)
    fi
    [ -x "$binary" ] || die "no executable gridq binary at $binary"
    if readelf -l "$binary" | grep -q 'Requesting program interpreter'; then
        die "$binary is dynamically linked; the images need a static one (scripts/release.sh)"
    fi
    mkdir -p "$work/bin"
    if ((strip)) && command -v objcopy >/dev/null 2>&1; then
        objcopy --strip-debug "$binary" "$work/bin/gridq"
    else
        cp "$binary" "$work/bin/gridq"
    fi
    chmod 0755 "$work/bin/gridq"
    if ! cmp -s "$work/bin/gridq" "$cache/gridq"; then
        cp "$work/bin/gridq" "$cache/gridq.partial" && mv "$cache/gridq.partial" "$cache/gridq"
    fi
    binary_ready=1
}

# context NAME FILES...: a fresh build context holding only FILES (never target/).
context() {
    local dir="$work/ctx-$1"
    shift
    rm -rf "$dir"
    mkdir -p "$dir"
    cp -p "$@" "$dir/"
    echo "$dir"
}

built=()
gridq_image=""
python_image=""
rabbitmq_image=""
prepare_binary

if wants python; then
    build_root gridq-python "${python_packages[@]}"
    python_image="gridq-python:$suite"
    built+=("$python_image")
fi

if wants gridq; then
    ca=/etc/ssl/certs/ca-certificates.crt
    [ -r "$ca" ] || die "no CA bundle at $ca (Debian's ca-certificates)"
    ctx=$(context gridq docker/Dockerfile "$work/bin/gridq" "$ca")
    printf 'root:x:0:0:root:/root:/sbin/nologin\ngridq:x:10001:10001:gridq:/var/lib/gridq:/sbin/nologin\n' >"$ctx/passwd"
    printf 'root:x:0:\ngridq:x:10001:\n' >"$ctx/group"
    mkdir -m 0700 "$ctx/state"
    hash=$(cat "$ctx/Dockerfile" "$ctx/gridq" "$ctx/ca-certificates.crt" "$ctx/passwd" "$ctx/group" | key_of)
    gridq_image="gridq:$version-$hash"
    if has_image "$gridq_image"; then
        log "$gridq_image is up to date"
    else
        docker_build "$gridq_image" "$ctx"
    fi
    docker run --rm "$gridq_image" --version >/dev/null || die "gridq does not run in $gridq_image"
    docker tag "$gridq_image" gridq:local
    prune gridq "$gridq_image" "$version-*"
    built+=("$gridq_image" gridq:local)
fi

if wants rabbitmq; then
    build_root gridq-rabbitmq-root "${rabbitmq_packages[@]}" -- "${rabbitmq_hooks[@]}"
    ctx=$(context rabbitmq docker/rabbitmq/Dockerfile docker/rabbitmq/entrypoint.sh \
        docker/rabbitmq/enabled_plugins)
    hash=$( (cat "$ctx/Dockerfile" "$ctx/entrypoint.sh" "$ctx/enabled_plugins" &&
        image_id "gridq-rabbitmq-root:$suite") | key_of)
    rabbitmq_image="gridq-rabbitmq:$version-$hash"
    if has_image "$rabbitmq_image"; then
        log "$rabbitmq_image is up to date"
    else
        docker_build "$rabbitmq_image" "$ctx" --build-arg "ROOT=gridq-rabbitmq-root:$suite"
    fi
    docker tag "$rabbitmq_image" gridq-rabbitmq:local
    prune gridq-rabbitmq "$rabbitmq_image" "$version-*"
    built+=("$rabbitmq_image" gridq-rabbitmq:local)
fi

# Images that lost their tag to a rebuild (--rebuild, or a tag moved) are garbage.
docker image prune --force --filter label=gridq.image=1 >/dev/null

if [ -n "$env_file" ]; then
    {
        echo "GRIDQ_IMAGE_SUITE=$suite"
        echo "GRIDQ_BINARY=$(realpath "$cache/gridq")"
        [ -z "$gridq_image" ] || echo "GRIDQ_IMAGE=$gridq_image"
        [ -z "$python_image" ] || echo "GRIDQ_USER_IMAGE=$python_image"
        [ -z "$rabbitmq_image" ] || echo "GRIDQ_RABBITMQ_IMAGE=$rabbitmq_image"
    } >"$env_file.partial"
    mv "$env_file.partial" "$env_file"
fi

# --- verification -------------------------------------------------------------------------

# wait_for WHAT SECONDS COMMAND...: polls COMMAND until it succeeds or the deadline passes.
wait_for() {
    local what=$1 limit=$2
    shift 2
    local deadline=$((SECONDS + limit))
    until "$@" >"$work/wait.out" 2>&1; do
        if ((SECONDS >= deadline)); then
            log "timed out after ${limit}s waiting for $what; last output:"
            cat "$work/wait.out" >&2
            return 1
        fi
        sleep 0.5
    done
}

# The AMQP 0-9-1 handshake: the protocol header, answered by a connection.start method frame
# (frame type 1 on channel 0, class 10, method 10).
amqp_answers() {
    python3 - "$1" "$2" <<'EOF'
import socket, struct, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as s:
    s.sendall(b"AMQP\x00\x00\x09\x01")
    head = b""
    while len(head) < 11:
        chunk = s.recv(11 - len(head))
        if not chunk:
            sys.exit(f"connection closed after {head!r}")
        head += chunk
kind, channel, _size, cls, method = struct.unpack(">BHIHH", head)
if (kind, channel, cls, method) != (1, 0, 10, 10):
    sys.exit(f"not a connection.start frame: {head!r}")
EOF
}

if ((verify)); then
    wants rabbitmq || die "--verify needs the rabbitmq image"
    t0=$SECONDS
    run_id="gridq-verify-$$"
    user="verify-$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')"
    pass=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
    conf="$work/rabbitmq"
    mkdir -p "$conf"
    cat >"$conf/rabbitmq.conf" <<EOF
default_user = $user
default_pass = $pass
loopback_users = none
listeners.tcp.default = 5672
management.tcp.port = 15672
consumer_timeout = 5000
EOF
    # Erlang terms; a value only this file sets, read back below to prove it was applied.
    printf '[{rabbit, [{channel_max, 1000}]}].\n' >"$conf/advanced.config"
    # Root-only, as deploy writes them: the entrypoint must still hand them to rabbitmq.
    chmod 0600 "$conf/rabbitmq.conf" "$conf/advanced.config"
    cleanup_steps+=("docker rm -f -v $run_id >/dev/null 2>&1; docker volume rm $run_id >/dev/null 2>&1")
    docker volume create --label gridq.image=1 "$run_id" >/dev/null
    docker run -d --name "$run_id" --label gridq.image=1 \
        -v "$run_id:/var/lib/rabbitmq" \
        -v "$conf/rabbitmq.conf:/etc/rabbitmq/rabbitmq.conf:ro" \
        -v "$conf/advanced.config:/etc/rabbitmq/advanced.config:ro" \
        -p 127.0.0.1::5672 -p 127.0.0.1::15672 gridq-rabbitmq:local >/dev/null
    amqp_port=$(docker port "$run_id" 5672/tcp | head -n1 | sed 's/.*://')
    mgmt_port=$(docker port "$run_id" 15672/tcp | head -n1 | sed 's/.*://')
    mgmt="http://127.0.0.1:$mgmt_port"
    wait_for "the management API of $run_id" 120 \
        curl -fsS -u "$user:$pass" "$mgmt/api/whoami" || { docker logs "$run_id" >&2; die "broker did not start"; }
    log "verify: broker answers after $(elapsed "$t0")"
    amqp_answers 127.0.0.1 "$amqp_port" || die "no AMQP handshake on 127.0.0.1:$amqp_port"
    log "verify: AMQP handshake on 127.0.0.1:$amqp_port"
    curl -fsS -u "$user:$pass" "$mgmt/api/whoami" | grep -q "\"name\":\"$user\"" ||
        die "management API: whoami is not $user"
    code=$(curl -s -o /dev/null -w '%{http_code}' -u "guest:guest" "$mgmt/api/whoami")
    [ "$code" = 401 ] || die "management API: guest got $code, expected 401"
    log "verify: management API on $mgmt takes $user (and refuses guest)"
    got=$(docker exec "$run_id" rabbitmqctl -q eval \
        '{application:get_env(rabbit, channel_max), application:get_env(rabbit, consumer_timeout)}.')
    [ "$got" = "{{ok,1000},{ok,5000}}" ] || die "config not applied: $got"
    log "verify: rabbitmq.conf and advanced.config applied ($got)"

    # The echo sweep, end to end in containers: master and two workers (gridq run --local)
    # in the python image, which holds no gridq: the static binary is mounted into it.
    if wants python; then
        t1=$SECONDS
        ip=$(docker inspect --format '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$run_id")
        # The URL carries the password: it goes in the environment, not on a command line.
        succeeded=$(docker run --rm --label gridq.image=1 \
            -e "GRIDQ_BROKER=amqp://$user:$pass@$ip:5672/%2f" \
            -v "$(realpath "$cache/gridq"):/gridq/gridq:ro" \
            -v "$PWD/projects/echo:/src:ro" --entrypoint /bin/sh "$python_image" -c '
                mkdir /project && cp -r /src/. /project/ && cd /project &&
                /gridq/gridq init -- /gridq/gridq run sweep.yaml --local --workers 2 \
                    --state-dir /tmp/state >/tmp/run.log 2>&1 ||
                    { cat /tmp/run.log >&2; exit 1; }
                grep -c ",succeeded," /tmp/state/results/echo.csv') ||
            die "the echo sweep failed in $python_image"
        [ "$succeeded" = 6 ] || die "the echo sweep in $python_image: $succeeded of 6 jobs succeeded"
        log "verify: echo sweep, 6 of 6 jobs succeeded in $python_image with the static gridq mounted, on the broker container ($(elapsed "$t1"))"
    fi
    if wants gridq; then
        count=$(docker run --rm -v "$PWD/projects/echo:/p:ro" gridq:local expand /p/sweep.yaml --format count)
        [ "$count" = 6 ] || die "gridq expand in gridq:local gave $count jobs, expected 6"
        log "verify: gridq expand in gridq:local (static, empty base): $count jobs"
    fi
    t2=$SECONDS
    docker stop -t 30 "$run_id" >/dev/null
    log "verify: broker stopped in $(elapsed "$t2") (exit $(docker inspect --format '{{.State.ExitCode}}' "$run_id"))"
    log "verify: all checks passed in $(elapsed "$t0")"
fi

log "images:"
for image in "${built[@]}"; do
    size=$(docker image inspect --format '{{.Size}}' "$image")
    printf '%-40s %6d MB\n' "$image" "$((size / 1000000))"
done
