#!/usr/bin/env bash
# docs/explorer.png: the tour's Explore cell, live in JupyterLab, in headless Debian chromium.
# Needs (not project dependencies): `apt-get install -y chromium` and a separate venv with playwright
# (`python3 -m venv /tmp/shotvenv && /tmp/shotvenv/bin/pip install playwright`; never `playwright install`).
set -euo pipefail
cd "$(dirname "$0")/../.."
SCRATCH=$(mktemp -d)
.venv/bin/python docs/screenshot/make_notebook.py "$SCRATCH"
env -u STUDY_HEADLESS .venv/bin/jupyter lab --allow-root --no-browser --ServerApp.token='' --ServerApp.password='' \
    --port 8899 --notebook-dir "$SCRATCH" > "$SCRATCH/jupyter.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER; wait $SERVER 2>/dev/null || true' EXIT
until curl -sf -o /dev/null http://127.0.0.1:8899/api/status; do sleep 1; done
"${SHOT_PYTHON:-/tmp/shotvenv/bin/python}" docs/screenshot/shoot.py docs/explorer.png
