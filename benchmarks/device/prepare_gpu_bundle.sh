#!/usr/bin/env bash
# Run HERE (not on the GPU machine), from the repo root: stage what train_gsm8k_gpu.sh needs into .device-bundle/
# (git-ignored via .git/info/exclude). The device image has torch/transformers/peft/accelerate but no TRL or datasets,
# no ../shared data and no model wheel, and a call carries at most 64 MiB, so the 94 MiB GGUF travels in two halves:
#   call 1: carry [".device-bundle/model-a"], command "true"                     (stages the first half)
#   call 2: carry [".device-bundle/model-b", ".device-bundle/site", ".device-bundle/data"],
#           command "bash benchmarks/device/train_gsm8k_gpu.sh"                  (reassembles and trains)
set -euo pipefail
B=.device-bundle
grep -qx "/$B/" .git/info/exclude 2>/dev/null || echo "/$B/" >> .git/info/exclude
rm -rf "$B" && mkdir -p "$B/model-a" "$B/model-b" "$B/site" "$B/data/gsm8k"
cp ../shared/data/gsm8k/train.jsonl ../shared/data/gsm8k/test.jsonl "$B/data/gsm8k/"
GGUF=$(.venv/bin/python -c 'from reasonlite.models import smollm2_gguf; print(smollm2_gguf())')
split -b 48M -d "$GGUF" "$B/model-a/part-"   # part-00, part-01
mv "$B/model-a/part-01" "$B/model-b/"
# Pure-python packages missing on the device image (versions as in our venv, Python 3.12 there).
SITE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for pkg in trl datasets gguf dill multiprocess; do
  cp -r "$SITE/$pkg" "$B/site/"
  cp -r "$SITE/$pkg"-*.dist-info "$B/site/" 2>/dev/null || true
done
# pydantic_core is compiled (cp311 here): fetch the cp312 wheel when a registry is reachable, else hope the image has it.
PCV=$(.venv/bin/python -c 'import pydantic_core; print(pydantic_core.__version__)')
mkdir -p "$B/site/.whl"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 -d "$B/site/.whl" "pydantic-core==$PCV" \
  || echo "warning: no pydantic-core cp312 wheel fetched; the device must already have pydantic"
for pkg in pydantic annotated_types typing_inspection; do cp -r "$SITE/$pkg" "$B/site/" 2>/dev/null || true; done
du -sh "$B"/*
