#!/usr/bin/env bash
# One command from a fresh clone: install, then explain a real prediction of the bundled
# zoo:minilm-sentiment model in the terminal and into out.html / out.json.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
salience explain --model zoo:minilm-sentiment --text "A gripping, beautifully acted film." \
  --method sig --method ig --method lime --html out.html --json out.json
