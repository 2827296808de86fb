#!/usr/bin/env bash
# Fetch, on this machine, the wheels the GPU machine's image lacks (its python3 is 3.12 with torch, timm, pandas,
# pyarrow, torchmetrics, opencv, typer, rich; not albumentations nor pydantic). They land in .whl/ (ignored by git)
# and travel with `carry: [".whl"]`; benchmarks/gpu_check.sh installs them there with --no-index --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_27_x86_64 -d .whl \
  albumentations==2.0.8 albucore==0.0.24 stringzilla==5.3.2 simsimd==6.5.16 \
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
# the MTCNN weights for benchmarks/faces_speed.py (read out of the wheel, never installed: not in .whl/*.whl)
python3 -m pip download --no-deps facenet-pytorch==2.6.0 -d .whl/weights
ls -la .whl .whl/weights
