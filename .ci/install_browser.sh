#!/usr/bin/env bash
# What the browser tests (tests/test_demo_browser.py, marker `browser`) need: Debian's headless
# Chromium, driven by Playwright for Python through executable_path=/usr/bin/chromium, and gradio
# (the app under test). Playwright's own browser download (`playwright install`) is never used:
# everything comes from apt and PyPI. Where this script cannot install Chromium (no root, no apt),
# the browser tests skip and say why.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
fi

if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update
    $SUDO apt-get install -y chromium chromium-driver
fi

python -m pip install "playwright>=1.40" "gradio>=6,<7"

chromium --version 2>/dev/null
python - <<'PY'
from importlib.metadata import version

import torch

print("gradio", version("gradio"), "| playwright", version("playwright"), "| torch", torch.__version__)
PY
