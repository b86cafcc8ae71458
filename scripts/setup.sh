#!/usr/bin/env bash
# Set up soundtag in ./.venv: the CPU build of torch first (a plain `torch`
# requirement would pull in GPU packages), then the package with its extras.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[dev]'
