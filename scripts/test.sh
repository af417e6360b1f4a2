#!/usr/bin/env bash
# One command from a fresh clone: install with the test oracles (Captum, tint, lime, shap), then
# run the test suite. Extra arguments go to pytest (e.g. `scripts/test.sh -m slow` for long tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m pytest -q -p no:cacheprovider "$@"
