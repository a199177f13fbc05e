#!/usr/bin/env bash
# Refreshes the chat page's vendored libraries (ui/vendor/) from npm, at the versions pinned in
# ui/vendor/package.json (and its lock file). The copies are checked in: a build needs no network,
# and `include_str!` compiles them into the binary. Run after changing a version; commit the result.
set -euo pipefail
cd "$(dirname "$0")/../ui/vendor"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp package.json "$work/"
[ -f package-lock.json ] && cp package-lock.json "$work/"
(cd "$work" && if [ -f package-lock.json ]; then npm ci --no-audit --no-fund --loglevel=error;
  else npm install --no-audit --no-fund --loglevel=error; fi)
cp "$work/package-lock.json" .
modules="$work/node_modules"
# Source-map comments name files we do not serve: drop them, so no browser asks for them.
strip_map() { sed '/^\/\/# sourceMappingURL=/d' "$1" > "$2"; }
strip_map "$modules/marked/lib/marked.umd.js" marked.js
strip_map "$modules/dompurify/dist/purify.min.js" purify.js
strip_map "$modules/@highlightjs/cdn-assets/highlight.min.js" highlight.js
mkdir -p licenses
cp "$modules/marked/LICENSE" licenses/marked.txt
cp "$modules/dompurify/LICENSE" licenses/dompurify.txt
cp "$modules/@highlightjs/cdn-assets/LICENSE" licenses/highlight.js.txt
sha256sum marked.js purify.js highlight.js > SHA256SUMS
echo "vendored: $(tr '\n' ' ' < SHA256SUMS)"
