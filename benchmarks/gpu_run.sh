#!/usr/bin/env bash
# The GPU benchmark run: on a lent GPU machine (python3 3.12 with CUDA torch, transformers,
# torchvision, opencv, numpy, scipy, scikit-image, scikit-learn, numba, pytorch-lightning; nothing
# can be fetched there), with .gpu/ staged here by benchmarks/gpu_stage.sh and carried along:
#
#   run tool: command "bash benchmarks/gpu_run.sh", carry [".gpu"], timeout_s 420
#
# 1. benchmarks/image_methods.py (EfficientNet-Lite0, the 8 photos; Salience vs Captum and
#    pytorch-grad-cam; model and inputs on cuda) -> $OUT/RESULTS-image-methods-gpu.md, written
#    before the text run starts; the usual settings plus batches 64 and 128 in the pass limit.
# 2. benchmarks/run.py on the random `small` and `base` BERTs at 32 / 128 / 512 tokens, every
#    method, with the peers whose packages travel (Captum, tint, lime, shap; not `minilm`: its
#    87 MiB weights stay behind) under a --budget from the time left -> $OUT/RESULTS-gpu.md.
# Logs: $OUT/image-methods.log, $OUT/text.log, $OUT/env.log.
#
# Dry run here on CPU (small settings; .venv's Python 3.11 and its shap):
#   GPU_PYTHON=.venv/bin/python GPU_QUICK=1 GPU_EXTRA_PATH=/tmp/gcpkgs OUT=/tmp/gpu-dry bash benchmarks/gpu_run.sh
# (GPU_EXTRA_PATH: a folder with cv2, which the GPU machine has; GPU_TEXT=0 skips the text run)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}
PY=${GPU_PYTHON:-python3}
QUICK=${GPU_QUICK:-}
TOTAL=${GPU_SECONDS:-400}  # the whole script, seconds (the run call's timeout_s less a margin)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
export SALIENCE_CACHE=$PWD/.gpu/cache
if "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then  # shap is compiled: its cp312 wheel
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gpu-site .gpu/whl/*.whl \
    || echo "shap wheel not installed: shap rows will fail"
fi
export PYTHONPATH=$PWD/src:$PWD/.gpu/site:/tmp/gpu-site${GPU_EXTRA_PATH:+:$GPU_EXTRA_PATH}  # extra: cv2 for a dry run

{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>&1
  "$PY" - <<'EOF'
import importlib.metadata as m, sys, torch
print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for p in ("transformers", "captum", "time-interpret", "lime", "shap", "grad-cam", "numba", "pytorch-lightning", "torchvision"):
    try:
        print(p, m.version(p))
    except m.PackageNotFoundError:
        print(p, "MISSING")
import importlib
for module in ("salience", "captum.attr", "tint.attr", "lime.lime_text", "shap", "pytorch_grad_cam", "cv2"):
    try:
        importlib.import_module(module)
        print("import", module, "ok")
    except Exception as error:  # shown here, before the runs that need it
        print("import", module, "FAILED:", type(error).__name__, error)
EOF
} 2>&1 | tee "$OUT/env.log"

# ---------------------------------------------------------------- 1. image methods (most valuable first)
if [ -n "$QUICK" ]; then
  image=(--quick --batches 1 2 4 --neuromask-iterations 1 2); image_limit=600
else
  image=(--batches 1 2 4 8 16 32 64 128); image_limit=$(( TOTAL / 2 ))
fi
timeout "$image_limit" "$PY" benchmarks/image_methods.py --grad-cam-path .gpu/site "${image[@]}" \
  --output "$OUT/RESULTS-image-methods-gpu.md" 2>&1 | tee "$OUT/image-methods.log"
echo "image_methods.py exit ${PIPESTATUS[0]} after $SECONDS s" | tee -a "$OUT/image-methods.log"

# ---------------------------------------------------------------- 2. text methods, the time left
[ "${GPU_TEXT:-1}" = 0 ] && exit 0
left=$(( TOTAL - SECONDS ))
if [ -n "$QUICK" ]; then
  text=(--quick --models small --lengths 32 --budget 1.5 --no-memory); text_limit=600
else
  budget=$(python3 -c "print(round(max($left - 60, 30) / 60, 2))" 2>/dev/null || echo 3)
  text=(--models small base --lengths 32 128 512 --budget "$budget" --repeats 3 --case-seconds 4 --core-seconds 4
        --max-run 30 --group-reserve 10 --memory-model base --memory-length 512 --memory-budget 2GB)
  text_limit=$(( left - 5 ))
fi
echo "text run: ${left} s left; ${text[*]}" | tee "$OUT/text.log"
timeout "$text_limit" "$PY" benchmarks/run.py "${text[@]}" --output "$OUT/RESULTS-gpu.md" 2>&1 | tee -a "$OUT/text.log"
echo "run.py exit ${PIPESTATUS[0]} after $SECONDS s" | tee -a "$OUT/text.log"
