#!/bin/sh
# Entry point of the gridq-rabbitmq image: runs rabbitmq-server in the foreground (logs on
# stdout) as the rabbitmq user.
#
# Started as root (the default), it first copies the mounted configuration into a directory
# only rabbitmq can read, so the files on the host may stay root-only, and hands the data
# volume to rabbitmq when it belongs to someone else (a fresh bind mount). Started as another
# user (docker run --user), it uses /etc/rabbitmq as it is.
set -eu

src=/etc/rabbitmq
data=/var/lib/rabbitmq
server=/usr/lib/rabbitmq/bin/rabbitmq-server

if [ "$(id -u)" != 0 ]; then
    exec "$server" "$@"
fi

conf=/run/gridq-rabbitmq
rm -rf "$conf"
install -d -o rabbitmq -g rabbitmq -m 0700 "$conf" "$conf/conf.d"
for f in rabbitmq.conf advanced.config enabled_plugins; do
    if [ -f "$src/$f" ]; then
        install -o rabbitmq -g rabbitmq -m 0600 "$src/$f" "$conf/$f"
    fi
done
if [ -d "$src/conf.d" ]; then
    for f in "$src"/conf.d/*.conf; do
        if [ -f "$f" ]; then
            install -o rabbitmq -g rabbitmq -m 0600 "$f" "$conf/conf.d/"
        fi
    done
fi
# gridq deploy's definitions and TLS files, named in its conf.d file by their /etc/rabbitmq
# paths: copied for rabbitmq too, and the copied configuration names the copies.
if [ -f "$src/definitions.json" ]; then
    install -o rabbitmq -g rabbitmq -m 0600 "$src/definitions.json" "$conf/definitions.json"
fi
if [ -d "$src/tls" ]; then
    install -d -o rabbitmq -g rabbitmq -m 0700 "$conf/tls"
    for f in "$src"/tls/*; do
        install -o rabbitmq -g rabbitmq -m 0600 "$f" "$conf/tls/"
    done
fi
for f in "$conf"/conf.d/*.conf; do
    if [ -f "$f" ]; then
        sed -i "s#$src/definitions.json#$conf/definitions.json#; s#$src/tls/#$conf/tls/#" "$f"
    fi
done
export RABBITMQ_CONFIG_FILE="$conf/rabbitmq.conf"
export RABBITMQ_CONFIG_FILES="$conf/conf.d"
export RABBITMQ_ADVANCED_CONFIG_FILE="$conf/advanced.config"
export RABBITMQ_ENABLED_PLUGINS_FILE="$conf/enabled_plugins"

if [ "$(stat -c %U "$data")" != rabbitmq ]; then
    chown -R rabbitmq:rabbitmq "$data"
fi
chmod 0750 "$data"

export HOME="$data"
cd "$data"
exec setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups "$server" "$@"
