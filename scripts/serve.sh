#!/usr/bin/env bash
# Runs the server with its embedded defaults: SQLite in ./mangoo.db, the embedded local model as
# the "default" bot, port 8000. Fetches the model first when it is missing. Extra arguments go to
# `mangoo serve`, e.g. `bash scripts/serve.sh --config mangoo.toml`.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mangoo-target}"
cargo build --release --locked --bin mangoo
mangoo="$CARGO_TARGET_DIR/release/mangoo"

# The model goes where this configuration says (--config FILE or MANGOO_CONFIG).
config_args=()
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --config) config_args=(--config "${args[i + 1]:-}") ;;
    --config=*) config_args=("${args[i]}") ;;
  esac
done
"$mangoo" model fetch "${config_args[@]}" >/dev/null

exec "$mangoo" serve "$@"
