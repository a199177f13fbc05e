#!/usr/bin/env bash
# Three Mangoo instances behind HAProxy on this machine, sharing the local PostgreSQL and Redis:
# the multi-instance deployment in one command. Prints the load balancer's URL and a token;
# Ctrl-C stops everything.
#
#   MANGOO_DATABASE_URL  default postgres://postgres@127.0.0.1:5432/mangoo (created if missing)
#   MANGOO_REDIS_URL     default redis://127.0.0.1:6379/0
#   MANGOO_JWT_SECRET    default: generated for this run (every instance must share it)
#   CLUSTER_PORT         the load balancer's port, default 8080 (instances on the next three)
#   MANGOO_CONFIG        a mangoo.toml for bots and the rest (each instance reads it)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mangoo-target}"

port="${CLUSTER_PORT:-8080}"
export MANGOO_DATABASE_URL="${MANGOO_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/mangoo}"
export MANGOO_REDIS_URL="${MANGOO_REDIS_URL:-redis://127.0.0.1:6379/0}"
export MANGOO_JWT_SECRET="${MANGOO_JWT_SECRET:-$(head -c 32 /dev/urandom | base64 | tr -d '/+=')}"

if ! command -v haproxy >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null
  else
    echo "haproxy is missing: install Debian's haproxy package" >&2
    exit 1
  fi
fi

cargo build --release --locked --bin mangoo
mangoo="$CARGO_TARGET_DIR/release/mangoo"
"$mangoo" model fetch >/dev/null

# The database, if this PostgreSQL lets us create it (the instances migrate it together).
if command -v psql >/dev/null; then
  db="${MANGOO_DATABASE_URL##*/}"; db="${db%%\?*}"
  admin="${MANGOO_DATABASE_URL%/*}/postgres"
  if ! psql "$admin" -Atc "SELECT 1 FROM pg_database WHERE datname = '$db'" 2>/dev/null | grep -q 1; then
    psql "$admin" -qc "CREATE DATABASE \"$db\"" || true
  fi
fi

logs="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true' EXIT INT TERM
for i in 1 2 3; do
  MANGOO_BIND="127.0.0.1:$((port + i))" "$mangoo" serve >"$logs/instance$i.out" 2>"$logs/instance$i.log" &
done
for i in 1 2 3; do
  until curl -sf "http://127.0.0.1:$((port + i))/readyz" >/dev/null; do
    if ! kill -0 %"$i" 2>/dev/null; then cat "$logs/instance$i.log" >&2; exit 1; fi
    sleep 0.1
  done
done
MANGOO_LB_BIND="127.0.0.1:$port" \
  MANGOO_INSTANCE_1="127.0.0.1:$((port + 1))" \
  MANGOO_INSTANCE_2="127.0.0.1:$((port + 2))" \
  MANGOO_INSTANCE_3="127.0.0.1:$((port + 3))" \
  haproxy -f deploy/haproxy.cfg -db >"$logs/haproxy.log" 2>&1 &
until curl -sf "http://127.0.0.1:$port/readyz" >/dev/null; do sleep 0.1; done

token="$("$mangoo" token --sub demo)"
cat <<INFO
Mangoo cluster: three instances behind HAProxy at http://127.0.0.1:$port
  instances  http://127.0.0.1:$((port + 1)) …$((port + 3))   logs in $logs
  database   $MANGOO_DATABASE_URL
  redis      $MANGOO_REDIS_URL
Try it (each request may land on a different instance):
  curl -N http://127.0.0.1:$port/api/v1/chat/stream -H "Authorization: Bearer $token" \\
    -H 'Content-Type: application/json' -d '{"bot_id":"default","message":"Hello!"}'
Ctrl-C stops the cluster.
INFO
wait
