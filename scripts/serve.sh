#!/usr/bin/env bash
# Runs the server with its embedded defaults (SQLite in ./mangoo.db). Extra arguments go to
# `mangoo serve`, e.g. `bash scripts/serve.sh --config mangoo.toml`.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mangoo-target}"
exec cargo run --release --locked --bin mangoo -- serve "$@"
