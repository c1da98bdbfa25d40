#!/usr/bin/env bash
# Run ON the GPU machine (device `run`), from the repo root, after benchmarks/device/prepare_gpu_bundle.sh staged
# .device-bundle/ (see there for the two calls). Trains the GSM8K PAL student with bf16 and packed batches of 64 for
# at most 6 minutes of training (whole command < 10 min), results in $OUT: metrics.json, adapter/, train.log.
set -euo pipefail
B=.device-bundle
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT" /tmp/site /tmp/model
if ls "$B/site/.whl/"*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$B/site/.whl/"*.whl
fi
cat "$B"/model-a/part-* "$B"/model-b/part-* > /tmp/model/SmolLM2-135M-Instruct.Q4_1.gguf
export PYTHONPATH="$PWD/src:$PWD:/tmp/site:$PWD/$B/site:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
export REASONLITE_CACHE_DIR="${REASONLITE_CACHE_DIR:-/tmp/reasonlite-cache}"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv || true
timeout 560 python3 benchmarks/device/train_gsm8k_gpu.py --model /tmp/model/SmolLM2-135M-Instruct.Q4_1.gguf \
  --data "$B/data/gsm8k" --out "$OUT" --batch 64 --max-steps 400 --time-limit 360 "$@" 2>&1 | tee "$OUT/train.log"
