#!/usr/bin/env bash
# Benchmarks Mangoo against a direct baseline, all on this machine (see docs/benchmarks.md).
# Usage: bash scripts/bench.sh [STREAMS] [TOKENS] [RATE]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mangoo-target}"
streams="${1:-1000}"; tokens="${2:-50}"; rate="${3:-20}"
cargo build --release --locked --bin mangoo --bin mangoo-bench >&2
bin="$CARGO_TARGET_DIR/release"
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
ulimit -n 65536 2>/dev/null || true

"$bin/mangoo-bench" upstream --bind 127.0.0.1:9200 2>"$work/upstream.log" &
secret="bench-secret-bench-secret-bench-secret"
cat >"$work/mangoo.toml" <<TOML
[server]
bind = "127.0.0.1:9201"
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
start_ns=$(date +%s%N)
MANGOO_LOG=warn "$bin/mangoo" serve --config "$work/mangoo.toml" >"$work/mangoo.out" 2>"$work/mangoo.log" &
mangoo_pid=$!
until curl -sf http://127.0.0.1:9201/healthz >/dev/null; do sleep 0.002; done
startup_ms=$(( ($(date +%s%N) - start_ns) / 1000000 ))
sleep 1
idle_rss_kb=$(awk '/VmRSS/ {print $2}' /proc/$mangoo_pid/status)
echo "{\"startup_ms\": $startup_ms, \"idle_rss_kb\": $idle_rss_kb}"

token=$(MANGOO_JWT_SECRET="$secret" "$bin/mangoo" token --sub bench --ttl 1h)
run() { "$bin/mangoo-bench" load --streams "$streams" --tokens "$tokens" --rate "$rate" "$@"; }
echo "== direct baseline"
run --target direct --url http://127.0.0.1:9200
echo "== through mangoo"
run --target mangoo --url http://127.0.0.1:9201 --token "$token" --server-pid "$mangoo_pid"
