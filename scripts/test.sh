#!/usr/bin/env bash
# Runs every check and test Mangoo has. CI (.ci/run) calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

# Reuse one build cache across clones so CI does not rebuild every dependency from zero.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mangoo-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --locked --all-targets
