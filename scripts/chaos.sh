#!/usr/bin/env bash
# Mangoo's chaos suite: three instances behind the shipped HAProxy config, on a PostgreSQL and a
# Redis (primary + replica) of the suite's own, each reached through a TCP path that can be
# black-holed (scripts/chaos-proxy.py); an OpenAI-compatible stand-in as the model. Conversations
# run through the load balancer (target/release/mangoo-chaos: an EventSource-style client that
# resumes with Last-Event-ID and checks every turn) while one fault per phase is injected.
#
#   bash scripts/chaos.sh            the short run (CHAOS_SECS=20 per phase), fails on any finding
#   CHAOS_KEEP=1 bash scripts/chaos.sh   keeps the logs (instances, proxies, databases)
#   CHAOS_SECS=120 CHAOS_REPORT=docs/reliability.md bash scripts/chaos.sh   the long run, written up
#
# CHAOS_CONVERSATIONS (default 20) conversations at once, CHAOS_TOKENS (100) tokens per answer at
# CHAOS_RATE (50) tokens/s. Needs root or a postgres user for initdb, haproxy, redis-server.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mangoo-target}"
secs="${CHAOS_SECS:-20}"
conversations="${CHAOS_CONVERSATIONS:-20}"
tokens="${CHAOS_TOKENS:-100}"
rate="${CHAOS_RATE:-50}"

# The test build's binaries (same features as scripts/test.sh's, so nothing is built twice).
cargo test --release --locked --all-targets --no-run >&2
bin="$CARGO_TARGET_DIR/release"
pg_bin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
work="$(mktemp -d)"
chmod 755 "$work"
declare -A pids
cleanup() {
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  [ -d "$work/pg/data" ] && as_postgres "$pg_bin/pg_ctl" -D "$work/pg/data" -m immediate stop >/dev/null 2>&1
  wait 2>/dev/null || true
  if [ -n "${CHAOS_KEEP:-}" ]; then echo "chaos: logs kept in $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
as_postgres() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
wait_for() { # wait_for WHAT COMMAND...: polls the command (20 s at most)
  local what="$1"; shift
  for _ in $(seq 200); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "chaos: $what never came up" >&2; exit 1
}

# PostgreSQL of its own (the suite restarts it), trust auth on 127.0.0.1.
pg_port=$(free_port)
mkdir "$work/pg"
[ "$(id -u)" = 0 ] && chown postgres "$work/pg"
as_postgres "$pg_bin/initdb" -D "$work/pg/data" -A trust -U postgres >/dev/null
pg() { as_postgres "$pg_bin/pg_ctl" -D "$work/pg/data" -l "$work/pg/log" -w "$@" >/dev/null; }
pg -o "-p $pg_port -k $work/pg -c listen_addresses=127.0.0.1 -c max_connections=200" start
psql_admin() { "$pg_bin/psql" -h 127.0.0.1 -p "$pg_port" -U postgres -Atqc "$1"; }
psql_admin "CREATE DATABASE chaos"

# Redis: a primary and its replica, each in a directory of its own, emptied at every start (a
# replica saves what it received as dump.rdb, which a restarted server would load).
redis_a=$(free_port); redis_b=$(free_port)
start_redis() { # start_redis PORT [ARGS...]
  local port="$1"; shift
  rm -rf "$work/redis-$port"; mkdir "$work/redis-$port"
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$work/redis-$port" \
    --repl-diskless-sync yes --repl-diskless-sync-delay 0 "$@" >"$work/redis-$port.log" 2>&1 &
  pids["redis$port"]=$!
  wait_for "redis on $port" redis-cli -p "$port" ping
}
start_redis "$redis_a"
start_redis "$redis_b" --replicaof 127.0.0.1 "$redis_a"
redis_primary=$redis_a; redis_replica=$redis_b

# The paths to the dependencies, each one's target in a file (a DNS name that can move).
path() { # path NAME TARGET: sets ${NAME}_path_port
  local port; port=$(free_port)
  echo "$2" >"$work/$1.target"
  python3 scripts/chaos-proxy.py "$port" "$work/$1.target" 2>"$work/$1-path.log" &
  pids["$1-path"]=$!
  printf -v "${1}_path_port" '%s' "$port"
}
path pg "127.0.0.1:$pg_port"
path redis "127.0.0.1:$redis_a"

upstream_port=$(free_port)
"$bin/mangoo-bench" upstream --bind "127.0.0.1:$upstream_port" 2>"$work/upstream.log" &
pids[upstream]=$!

secret="chaos-secret-chaos-secret-chaos-secret"
cat >"$work/mangoo.toml" <<TOML
[server]
drain_secs = 15
max_connections_per_address = 100000
[auth]
jwt_secret = "$secret"
[database]
url = "postgres://postgres@127.0.0.1:$pg_path_port/chaos"
[redis]
url = "redis://127.0.0.1:$redis_path_port/0"
[rate_limit]
requests_per_second = 100000.0
burst = 100000
max_concurrent_streams = 100000
[quotas]
max_chats_per_user = 1000000
[providers.openai]
base_url = "http://127.0.0.1:$upstream_port/v1"
[[bots]]
id = "bench"
provider = "openai"
model = "bench"
TOML

declare -A instance_port
start_instance() { # start_instance N
  MANGOO_BIND="127.0.0.1:${instance_port[$1]}" MANGOO_LOG=warn "$bin/mangoo" serve \
    --config "$work/mangoo.toml" >>"$work/instance$1.out" 2>>"$work/instance$1.log" &
  pids["instance$1"]=$!
  wait_for "instance $1" curl -sf "http://127.0.0.1:${instance_port[$1]}/readyz"
}
for i in 1 2 3; do instance_port[$i]=$(free_port); start_instance "$i"; done
lb_port=$(free_port)
MANGOO_LB_BIND="127.0.0.1:$lb_port" MANGOO_INSTANCE_1="127.0.0.1:${instance_port[1]}" \
  MANGOO_INSTANCE_2="127.0.0.1:${instance_port[2]}" MANGOO_INSTANCE_3="127.0.0.1:${instance_port[3]}" \
  haproxy -f deploy/haproxy.cfg -db >"$work/haproxy.log" 2>&1 &
pids[haproxy]=$!
wait_for "haproxy" curl -sf "http://127.0.0.1:$lb_port/readyz"
token=$(for u in $(seq 1 5); do MANGOO_JWT_SECRET="$secret" "$bin/mangoo" token --sub "chaos$u" --ttl 24h; done | paste -sd, -)

# ---- The faults ------------------------------------------------------------------------------

fault_none() { :; }
fault_kill_instance() { # kill -9 a different instance every few seconds, each started again
  for i in 2 3 1; do
    kill -9 "${pids[instance$i]}"; wait "${pids[instance$i]}" 2>/dev/null || true
    sleep 1; start_instance "$i"; sleep $((secs / 6))
  done
}
fault_rolling_restart() { # SIGTERM, drain, start again, one instance after another
  for i in 1 2 3; do
    kill -TERM "${pids[instance$i]}"; wait "${pids[instance$i]}" 2>/dev/null || true
    start_instance "$i"
  done
}
fault_redis_restart_empty() { # the primary killed and started again with nothing in it
  kill -9 "${pids[redis$redis_primary]}"; wait "${pids[redis$redis_primary]}" 2>/dev/null || true
  sleep 3
  start_redis "$redis_primary"
}
fault_redis_promotion() { # the replica promoted, the primary demoted, the name moved
  redis-cli -p "$redis_replica" replicaof no one >/dev/null
  redis-cli -p "$redis_primary" replicaof 127.0.0.1 "$redis_replica" >/dev/null
  echo "127.0.0.1:$redis_replica" >"$work/redis.target"
  kill -HUP "${pids[redis-path]}"
  local old=$redis_primary; redis_primary=$redis_replica; redis_replica=$old
}
fault_pg_terminate() { # every connection of the database ended, three times
  for _ in 1 2 3; do
    psql_admin "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                WHERE datname = 'chaos' AND pid <> pg_backend_pid()" >/dev/null
    sleep 2
  done
}
fault_pg_restart() { pg -m fast restart; }
fault_redis_black_hole() { kill -USR1 "${pids[redis-path]}"; sleep 10; kill -USR2 "${pids[redis-path]}"; }
fault_pg_black_hole() { kill -USR1 "${pids[pg-path]}"; sleep 10; kill -USR2 "${pids[pg-path]}"; }

# ---- The phases ------------------------------------------------------------------------------

# /readyz of every instance, four times a second, one line per answer (`down`: no answer).
sample_readiness() {
  while :; do
    for i in 1 2 3; do
      curl -s -m 3 -w ' %{http_code}\n' "http://127.0.0.1:${instance_port[$i]}/readyz" || echo down
    done
    sleep 0.25
  done >"$1"
}
# The dependency a phase's outage must show in /readyz (long enough to be sampled for sure).
declare -A named=([redis_restart_empty]=redis [redis_black_hole]=redis [pg_black_hole]=database)
all_ready() { for i in 1 2 3; do curl -sf "http://127.0.0.1:${instance_port[$i]}/readyz" || return 1; done; }

table="$work/table.md"
echo "| phase | turns | events | done | stopped | interrupted | other errors | resumes | 503 (Retry-After) | LB 503 | 5xx other | hung | failed | /readyz 503 redis / database |" >"$table"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" >>"$table"
findings=0
phase() { # phase NAME: conversations for $secs, the fault injected a quarter of the way in
  local name="$1" client
  "$bin/mangoo-chaos" --url "http://127.0.0.1:$lb_port" --token "$token" \
    --conversations "$conversations" --duration-secs "$secs" --tokens "$tokens" --rate "$rate" \
    >"$work/$name.json" 2>"$work/$name.err" &
  client=$!
  sample_readiness "$work/$name.readyz" &
  local sampler=$!
  sleep $((secs / 4))
  "fault_$name"
  if ! wait "$client"; then findings=$((findings + 1)); fi
  kill "$sampler"; wait "$sampler" 2>/dev/null || true
  # Readiness follows the dependencies: the outage named while it lasts, ready again after it.
  local redis_503 database_503
  redis_503=$(grep -c 'redis.* 503$' "$work/$name.readyz" || true)
  database_503=$(grep -c 'database.* 503$' "$work/$name.readyz" || true)
  local expected="${named[$name]:-}"
  if [ -n "$expected" ] && ! grep -q "$expected.* 503\$" "$work/$name.readyz"; then
    echo "chaos: $name: /readyz never named $expected" >&2; findings=$((findings + 1))
  fi
  wait_for "every instance ready after $name" all_ready
  if [ ! -s "$work/$name.json" ]; then
    echo "chaos: $name: the client reported nothing" >&2; cat "$work/$name.err" >&2; exit 1
  fi
  python3 - "$name" "$work/$name.json" "$redis_503" "$database_503" >>"$table" <<'PY'
import json, sys
name, path, redis_503, database_503 = sys.argv[1:]
r = json.load(open(path))
keys = ["turns", "events", "done", "stopped", "interrupted", "other_errors", "resumes", "refused_503",
        "load_balancer_503", "server_errors_5xx_other_than_503", "hung", "failed"]
cells = [str(r[k]) for k in keys] + [f"{redis_503} / {database_503}"]
print("| " + name.replace("_", " ") + " | " + " | ".join(cells) + " |")
for failure in r["first_failures"]:
    print(f"chaos: {name}: {failure}", file=sys.stderr)
PY
  echo "chaos: $name done" >&2
}
for name in none kill_instance rolling_restart redis_restart_empty redis_promotion \
  pg_terminate pg_restart redis_black_hole pg_black_hole; do
  phase "$name"
done

cat "$table"
if [ -n "${CHAOS_REPORT:-}" ]; then
  python3 - "$CHAOS_REPORT" "$table" "$secs" "$conversations" "$tokens" "$rate" <<'PY'
import sys, datetime
report, table, secs, conversations, tokens, rate = sys.argv[1:]
text = open(report).read()
start, end = "<!-- chaos:begin -->", "<!-- chaos:end -->"
run = (f"{start}\nRun of {datetime.date.today()}: {conversations} conversations, {tokens}-token "
       f"answers at {rate} tokens/s, {secs} s per phase.\n\n" + open(table).read() + end)
head, _, rest = text.partition(start)
_, _, tail = rest.partition(end)
open(report, "w").write(head + run + tail)
PY
fi
if [ "$findings" -ne 0 ]; then
  echo "chaos: $findings phase(s) with findings; logs were in $work" >&2
  for f in "$work"/instance*.log; do echo "== $f"; tail -20 "$f"; done >&2
  exit 1
fi
