#!/usr/bin/env bash
# One command from a fresh clone: install with the test oracles (Captum, tint, lime, shap), then
# run the test suite. Extra arguments go to pytest (e.g. `scripts/test.sh -m slow` for long tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# Debian's chromium for the viewer's browser tests (tests/serve/test_browser.py, skipped without it);
# never fails the run: without apt-get, or when it fails, one warning line
if ! command -v chromium >/dev/null 2>&1; then
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo_cmd="sudo -n"
  if command -v apt-get >/dev/null 2>&1 && { $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 \
       || { $sudo_cmd apt-get update -qq >/dev/null 2>&1 && $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1; }; }; then
    echo "installed Debian's chromium for the viewer's browser tests"
  else
    echo "warning: could not install Debian's chromium (apt-get missing or failed): tests/serve/test_browser.py will be skipped" >&2
  fi
fi
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m pytest -q -p no:cacheprovider "$@"
