#!/usr/bin/env bash
# Set up soundtag in ./.venv: the CPU build of torch first (a plain `torch`
# requirement would pull in GPU packages), then the package with its extras.
# The web page's browser test drives Debian's Chromium (Playwright cannot
# download its own browsers here): installed when running as root and missing.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[dev]'
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null
fi
