#!/usr/bin/env bash
# Re-vendors the console's third-party browser code from the npm registry, pinned by
# package-lock.json, into assets/vendor/ (checked in: tesserad embeds it; no Node.js at run
# time or in the Rust build). Run by hand after changing package.json; needs npm.
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp package.json package-lock.json "$tmp/"
(cd "$tmp" && npm ci --ignore-scripts --no-audit --no-fund >/dev/null)
mkdir -p assets/vendor
u="$tmp/node_modules/uplot"
cp "$u/dist/uPlot.iife.min.js" "$u/dist/uPlot.min.css" assets/vendor/
cp "$u/LICENSE" assets/vendor/uPlot-LICENSE
x="$tmp/node_modules/@xterm/xterm"
cp "$x/lib/xterm.mjs" "$x/css/xterm.css" assets/vendor/
cp "$x/LICENSE" assets/vendor/xterm-LICENSE
echo "vendored xterm.js $(node -p "require('$x/package.json').version") into assets/vendor/"
echo "vendored uPlot $(node -p "require('$u/package.json').version") into assets/vendor/"
