#!/usr/bin/env bash
# Correctness checks that need a GPU (run on a lent machine with .gpu/ staged by gpu_stage.sh):
#   run tool: command "bash benchmarks/gpu_checks.sh", carry [".gpu"], timeout_s 200
# 1. the tests marked for CUDA (cuda vs CPU results of RISE, SmoothGrad, GradientSHAP);
# 2. every image method on EfficientNet-Lite0 on cuda: finite scores, and the same map as on the CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 SALIENCE_CACHE=$PWD/.gpu/cache
export PYTHONPATH=$PWD/src:$PWD/.gpu/site
python3 -m pytest -q -p no:cacheprovider tests/methods/test_rise.py tests/methods/test_gradient.py -k cuda -rs 2>&1 | tail -15
python3 - <<'PY'
import numpy as np, torch, salience
from salience.datasets.photos import load_photos
torch.backends.cudnn.allow_tf32 = False; torch.backends.cuda.matmul.allow_tf32 = False
photo = load_photos()[0].path
cpu = salience.load_model("zoo:efficientnet-lite0")
gpu = salience.load_model("zoo:efficientnet-lite0"); gpu.model.to("cuda")
for method, kw in [("saliency", {}), ("grad_cam", {}), ("guided_backprop", {}), ("smoothgrad", {"n_samples": 8}),
                   ("occlusion", {}), ("rise", {"n_masks": 500}), ("lrp", {}), ("deeplift", {}), ("score_cam", {}),
                   ("neuromask", {"iterations": 20})]:
    try:
        a = salience.explain(cpu, photo, method=method, **kw); b = salience.explain(gpu, photo, method=method, **kw)
        scale = float(np.nanmax(np.abs(a.scores))) or 1.0
        print(f"{method:16s} finite={np.isfinite(b.scores).all()} max|gpu-cpu|/max|cpu|={float(np.nanmax(np.abs(a.scores-b.scores)))/scale:.2e} "
              f"layer={b.params.get('layer', '')}")
    except Exception as error:
        print(f"{method:16s} FAILED {type(error).__name__}: {error}")
PY
