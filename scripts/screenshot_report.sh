#!/usr/bin/env bash
# Render a report.html in headless Chromium, offline, and save a full-page screenshot to look at.
# Not part of CI (needs `apt-get install -y chromium`).
#
#   scripts/screenshot_report.sh runs/<name>/report.html [out.png] [height]
#
# Network access is blocked at the browser level (a proxy that does not exist), so an external
# reference in the report would show up as a broken image instead of being fetched.
set -euo pipefail
report="${1:?usage: $0 REPORT.html [OUT.png] [HEIGHT]}"
out="${2:-${report%.html}.png}"
height="${3:-4000}"
browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
if [ -z "$browser" ]; then
  echo "no chromium found; install it with: apt-get install -y chromium" >&2
  exit 2
fi
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
  --no-first-run --disable-sync --user-data-dir="$profile" --proxy-server="http://127.0.0.1:9" \
  --hide-scrollbars --screenshot="$(realpath -m "$out")" --window-size="1280,${height}" \
  "file://$(realpath "$report")" >/dev/null 2>&1
echo "screenshot: $out"
