#!/usr/bin/env bash
# Benchmarks Mangoo against a direct baseline, all on this machine (see docs/benchmarks.md).
#
#   bash scripts/bench.sh burst  N TOKENS RATE        N streams starting together (a, b, c, f)
#   bash scripts/bench.sh steady N TOKENS RATE SECS   N streams kept in flight for SECS (a, b)
#   bash scripts/bench.sh search RATE TOKENS          the most tokens/s with added p99 < 5 ms (d)
#   bash scripts/bench.sh hold   N                    N streams held open, memory per stream (e)
#   bash scripts/bench.sh shared N TOKENS RATE        in-process vs shared state (PostgreSQL +
#                                                     Redis), same load, same run (issue #13)
#
# Every run verifies every stream; a run with errors exits non-zero and is not a result.
# MANGOO_CPUS / CLIENT_CPUS (taskset lists, e.g. 0 and 1) pin Mangoo and the client + stand-in;
# MANGOO_WORKERS sets the number of Mangoo runtime threads; MANGOO_PROFILE the cargo profile;
# MANGOO_WRAP a command Mangoo runs under (e.g. "heaptrack -o /tmp/mangoo": memory per stream).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mangoo-target}"
mode="${1:-burst}"
# MANGOO_PROFILE=production measures the whole-program-optimised build (Cargo.toml).
profile="${MANGOO_PROFILE:-release}"
cargo build --profile "$profile" --locked --bin mangoo --bin mangoo-bench >&2
bin="$CARGO_TARGET_DIR/$profile"
work="$(mktemp -d)"
trap 'stop_mangoo 2>/dev/null; kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

pin() { # pin CPUS command...: runs the command on those CPUs when a list is given
  local cpus="$1"; shift
  if [ -n "$cpus" ]; then exec taskset -c "$cpus" "$@"; else exec "$@"; fi
}
pin "${CLIENT_CPUS:-}" "$bin/mangoo-bench" upstream --bind 127.0.0.1:9200 2>"$work/upstream.log" &
secret="bench-secret-bench-secret-bench-secret"
cat >"$work/mangoo.toml" <<TOML
[server]
bind = "127.0.0.1:9201"
heartbeat_secs = ${HEARTBEAT_SECS:-15}
# One client address and one user open every stream: lift the per-address and per-user caps.
max_connections = 1000000
max_connections_per_address = 1000000
[quotas]
max_chats_per_user = 1000000000
max_bytes_per_user = 1000000000000
[auth]
jwt_secret = "$secret"
[database]
url = "sqlite://$work/bench.db"
[rate_limit]
requests_per_second = 1000000.0
burst = 1000000
max_concurrent_streams = 1000000
[providers.openai]
base_url = "http://127.0.0.1:9200/v1"
[[bots]]
id = "bench"
provider = "openai"
model = "bench"
TOML

# f. start-up time (until /healthz answers) and idle memory, without the local model.
# MANGOO_WORKERS: Mangoo's runtime threads (tokio reads TOKIO_WORKER_THREADS; default: one per core).
[ -n "${MANGOO_WORKERS:-}" ] && export_workers=(env TOKIO_WORKER_THREADS="$MANGOO_WORKERS") || export_workers=()
start_mangoo() { # start_mangoo CONFIG: starts Mangoo, waits for /healthz; sets mangoo_pid
  start_ns=$(date +%s%N)
  # shellcheck disable=SC2086 # MANGOO_WRAP is a command line, split on purpose
  MANGOO_LOG=warn pin "${MANGOO_CPUS:-}" "${export_workers[@]}" ${MANGOO_WRAP:-} "$bin/mangoo" serve --config "$1" \
    >"$work/mangoo.out" 2>>"$work/mangoo.log" &
  mangoo_pid=$!
  until curl -sf http://127.0.0.1:9201/healthz >/dev/null; do
    kill -0 "$mangoo_pid" 2>/dev/null || { cat "$work/mangoo.log" >&2; exit 1; }
    sleep 0.002
  done
  startup_ms=$(( ($(date +%s%N) - start_ns) / 1000000 ))
}
# Under MANGOO_WRAP (e.g. heaptrack's script) Mangoo is the wrapper's child: stop both, or the
# server outlives the run and the next run's /healthz check answers from the stale one.
stop_mangoo() { [ -n "${mangoo_pid:-}" ] || return 0; pkill -P "$mangoo_pid" 2>/dev/null || true; kill "$mangoo_pid" 2>/dev/null || true; wait "$mangoo_pid" 2>/dev/null || true; }
start_mangoo "$work/mangoo.toml"
sleep 1
idle_rss_kb=$(awk '/VmRSS/ {print $2}' /proc/$mangoo_pid/status)
echo "{\"startup_ms\": $startup_ms, \"idle_rss_kb\": $idle_rss_kb}"

# BENCH_USERS: spread the streams over this many users (one token each), as real traffic is.
token=$(for u in $(seq 1 "${BENCH_USERS:-1}"); do
  MANGOO_JWT_SECRET="$secret" "$bin/mangoo" token --sub "bench$u" --ttl 24h; done | paste -sd, -)
load() { (pin "${CLIENT_CPUS:-}" "$bin/mangoo-bench" load "$@"); }
direct() { load --target direct --url http://127.0.0.1:9200 "$@"; }
mangoo() { load --target mangoo --url http://127.0.0.1:9201 --token "$token" --server-pid "$mangoo_pid" "$@"; }
both() {
  echo "== direct baseline"; direct "$@"
  echo "== through mangoo"; mangoo "$@"
}

case "$mode" in
  burst)
    both --streams "${2:-1000}" --tokens "${3:-50}" --rate "${4:-20}" ;;
  steady)
    both --streams "${2:-1000}" --tokens "${3:-50}" --rate "${4:-20}" --duration-secs "${5:-20}" ;;
  search)
    # Raise the number of streams at a fixed per-stream rate until Mangoo's p99 per-token latency
    # exceeds the direct baseline's (same load, same run) by 5 ms.
    rate="${2:-100}"; tokens="${3:-500}"
    for streams in 10 25 50 100 200 400 600 800 1000 1500 2000; do
      d=$(direct --streams "$streams" --tokens "$tokens" --rate "$rate")
      m=$(mangoo --streams "$streams" --tokens "$tokens" --rate "$rate")
      python3 - "$d" "$m" <<'PY' || break
import json, sys
d, m = json.loads(sys.argv[1]), json.loads(sys.argv[2])
added = (m["token_latency_us"]["p99"] - d["token_latency_us"]["p99"]) / 1000
print(json.dumps({"streams": m["streams_in_flight"], "direct_tok_s": round(d["tokens_per_s"]),
  "mangoo_tok_s": round(m["tokens_per_s"]), "direct_p99_ms": d["token_latency_us"]["p99"] / 1000,
  "mangoo_p99_ms": m["token_latency_us"]["p99"] / 1000, "added_p99_ms": round(added, 2),
  "cpu_s_per_million": m["server_cpu_s_per_million_tokens"]}))
sys.exit(0 if added < 5 else 3)
PY
    done ;;
  shared)
    # The same load twice in one run: in-process (SQLite, memory log), then shared (PostgreSQL +
    # Redis: stream log, leases, limits), with Redis's memory sampled while the answers are live.
    args=(--streams "${2:-1000}" --tokens "${3:-50}" --rate "${4:-20}")
    echo "== in-process"; mangoo "${args[@]}"
    stop_mangoo
    pg_admin="${BENCH_POSTGRES_ADMIN:-postgres://postgres@127.0.0.1:5432/postgres}"
    redis_url="${BENCH_REDIS_URL:-redis://127.0.0.1:6379/0}"
    db="mangoo_bench_$$"; prefix="mangoo-bench-$$"
    psql "$pg_admin" -qc "CREATE DATABASE $db"
    trap 'stop_mangoo 2>/dev/null; kill $(jobs -p) 2>/dev/null || true; psql "$pg_admin" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true; redis-cli -u "$redis_url" --scan --pattern "$prefix:*" | xargs -r redis-cli -u "$redis_url" del >/dev/null; rm -rf "$work"' EXIT
    sed -e "s|^url = \"sqlite://.*|url = \"${pg_admin%/*}/$db\"\nmax_connections = 32|" "$work/mangoo.toml" >"$work/shared.toml"
    printf '[redis]\nurl = "%s"\nkey_prefix = "%s"\n' "$redis_url" "$prefix" >>"$work/shared.toml"
    start_mangoo "$work/shared.toml"
    base=$(redis-cli -u "$redis_url" info memory | awk -F: '/^used_memory:/ {print $2+0}')
    ( peak=$base; while kill -0 "$mangoo_pid" 2>/dev/null; do
        m=$(redis-cli -u "$redis_url" info memory | awk -F: '/^used_memory:/ {print $2+0}')
        [ "$m" -gt "$peak" ] && peak=$m && echo "$peak" >"$work/redis_peak"
        sleep 0.1
      done ) &
    # The shared services' own CPU counts too: every redis-server and postgres process's time.
    ticks() { for p in $(pgrep -x "$1"); do
        awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null; done | awk '{s += $1} END {print s + 0}'; }
    redis_before=$(ticks redis-server); postgres_before=$(ticks postgres)
    echo "== shared (PostgreSQL + Redis)"; mangoo "${args[@]}"
    redis_cpu=$(( $(ticks redis-server) - redis_before )); postgres_cpu=$(( $(ticks postgres) - postgres_before ))
    peak=$(cat "$work/redis_peak" 2>/dev/null || echo "$base")
    hz=$(getconf CLK_TCK)
    echo "{\"redis_used_memory_base\": $base, \"redis_used_memory_peak\": $peak, \"redis_bytes_per_live_answer\": $(( (peak - base) / ${2:-1000} )), \"redis_cpu_s\": $(python3 -c "print($redis_cpu / $hz)"), \"postgres_cpu_s\": $(python3 -c "print($postgres_cpu / $hz)")}"
    ;;
  hold)
    # Two tokens: the first at once, the second after 30 s. In between the streams are idle.
    mangoo --streams "${2:-1000}" --tokens 2 --rate 0.0333 ;;
  *) echo "unknown mode $mode" >&2; exit 2 ;;
esac
