#!/usr/bin/env bash
# The HTML report in a real browser: a small real search (the smoke config, two Ray Tune trials, 12 epochs), its
# `augsearch report` page with the comparison table's baseline rows, and headless Chromium loading that page:
# any console message fails the check, and the screenshot (taken once the page has settled: images decoded and
# painted) goes to experiments/report/screenshot.png.
# Needs Debian's Chromium: apt-get install -y chromium. A few minutes on a CPU.
# Usage: bash experiments/report/check.sh [WORK_DIR]   (default runs/report-check; its search folder must be new)
set -euo pipefail
cd "$(dirname "$0")/../.."
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="${RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER:-0}"
work=${1:-runs/report-check}
browser=$(command -v chromium || command -v chromium-browser) || { echo "no chromium: apt-get install -y chromium" >&2; exit 1; }

augsearch search experiments/smoke.toml --out "$work/search" \
    --set train.epochs=12 --set train.iterations=8 --set "data.root=\"$work/data\""
augsearch report "$work/search" --out "$work/report.html" --baselines experiments/comparison/results.csv

"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1200,1600 \
    --virtual-time-budget=10000 --enable-logging=stderr --v=0 --screenshot=experiments/report/screenshot.png \
    "file://$(realpath "$work/report.html")" 2> "$work/chromium.log"
if grep -F "CONSOLE" "$work/chromium.log"; then
    echo "the report logged to the browser console (above); full log: $work/chromium.log" >&2
    exit 1
fi
echo "no console message; screenshot: experiments/report/screenshot.png (report: $work/report.html)"
