#!/usr/bin/env bash
# One short GPU check for the device machine (python3 there has torch, timm, opencv, pandas; the rest travels as
# wheels in .whl/, see benchmarks/README or the issue note). Runs the real recipes' GPU path and the CUDA leg of the
# recipe smoke tests. Usage there:  bash benchmarks/gpu_check.sh "$OUT"
set -euo pipefail
OUT_DIR=${1:-/tmp/gpu_check}
mkdir -p "$OUT_DIR"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1  # no network there (fer_bench sets the latter itself on import)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm, albumentations; print('torch', torch.__version__, 'timm', timm.__version__, 'albumentations', albumentations.__version__)"
python3 benchmarks/gpu_check.py --epochs 2 --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/gpu_check.log"
# the real-recipe smoke tests again, now on CUDA (runtime.device=auto picks the GPU)
python3 -m pytest -q -p no:cacheprovider tests/test_real_recipes.py 2>&1 | tail -3 | tee -a "$OUT_DIR/gpu_check.log"
