#!/usr/bin/env bash
# Render a report.html (written by attribute, detect-mislabeled, select-data, ...) to a PNG in headless
# Chromium, to see what a reader sees without opening a browser:
#
#   bash scripts/render_report.sh hyperinf-out/attribute/report.html /tmp/report_preview.png [WIDTH,HEIGHT]
#
# The page loads nothing from the network, so Chromium runs with no server and no network.  The window
# defaults to 1280x2000 pixels (a tall first screen: the settings and the first sections).
# Exit status: 0 rendered, 1 Chromium failed or wrote no PNG, 2 usage error or Chromium not installed.
set -uo pipefail

if [ $# -lt 2 ] || [ $# -gt 3 ]; then
    echo "usage: $0 REPORT.html OUT.png [WIDTH,HEIGHT]" >&2
    exit 2
fi
report=$1
png=$2
size=${3:-1280,2000}
if [ ! -f "$report" ]; then
    echo "$0: $report: file not found" >&2
    exit 2
fi

browser=""
for name in chromium chromium-browser google-chrome; do
    if command -v "$name" >/dev/null 2>&1; then
        browser=$name
        break
    fi
done
if [ -z "$browser" ]; then
    echo "$0: Chromium is not installed; on Debian/Ubuntu: sudo apt-get install -y chromium" >&2
    exit 2
fi

abs_report=$(cd "$(dirname "$report")" && pwd)/$(basename "$report")
mkdir -p "$(dirname "$png")"
abs_png=$(cd "$(dirname "$png")" && pwd)/$(basename "$png")
rm -f "$abs_png"
# a throw-away profile: no state of the user's browser is read or written
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
timeout 120 "$browser" --headless --disable-gpu --no-sandbox --hide-scrollbars --no-first-run \
    --user-data-dir="$profile" --window-size="$size" --screenshot="$abs_png" "file://$abs_report" \
    >"$profile/chromium.log" 2>&1
status=$?
if [ ! -s "$abs_png" ]; then
    echo "$0: $browser wrote no screenshot (exit status $status); its log:" >&2
    tail -20 "$profile/chromium.log" >&2
    exit 1
fi
echo "$abs_png"
