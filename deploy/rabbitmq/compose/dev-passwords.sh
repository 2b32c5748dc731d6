#!/bin/sh
# compose only (development): the users of definitions.json ship without passwords, so that
# no published password ever works. At its first start this broker gives each one a random
# password, kept in the shared volume /run/identity-broker (one file per user) for the
# containers of this compose project, with the user's broker URL beside it (`<user>.amqp-url`,
# what the worker and the mail sender read through IDENTITY_AMQP_URL_FILE, and
# `<user>.amqps-url`, the same over TLS, for compose.tls.yaml); later starts set
# the same ones again. Production sets its own passwords with `rabbitmqctl change_password`
# (docs/runbook.md).
set -eu
dir=/run/identity-broker
users="identity-worker web-gateway admin-tool account-events mail-sender"
rm -f "$dir/ready"

docker-entrypoint.sh rabbitmq-server &
server=$!
trap 'kill -TERM "$server"; wait "$server"; exit $?' TERM INT

until rabbitmqctl -q await_startup >/dev/null 2>&1; do sleep 1; done
for user in $users; do
    if [ ! -s "$dir/$user" ]; then
        od -An -N24 -tx1 /dev/urandom | tr -d ' \n' > "$dir/$user"
    fi
    rabbitmqctl -q change_password "$user" "$(cat "$dir/$user")"
    printf 'amqp://%s:%s@rabbitmq:5672/identity\n' "$user" "$(cat "$dir/$user")" \
        > "$dir/$user.amqp-url"
    printf 'amqps://%s:%s@rabbitmq:5671/identity\n' "$user" "$(cat "$dir/$user")" \
        > "$dir/$user.amqps-url"
done
touch "$dir/ready"
wait "$server"
