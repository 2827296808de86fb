#!/usr/bin/env bash
# One GPU check for the device machine, at most 9 minutes (budget: throughput table ~3 min, a real recipe 2 min of
# training plus rendering/caching, the 2-process DDP check ~1 min, faces throughput ~1 min). python3 there has torch, timm, opencv, pandas,
# pyarrow, torchmetrics; what is missing travels as wheels in .whl/, fetched here by benchmarks/gpu_wheels.sh
# (albumentations 2.0.8 and pydantic with their needs; mlflow is not needed: every run here sets
# tracking.enabled=false). The device tool's call: carry [".whl"], command `bash benchmarks/gpu_check.sh "$OUT"`,
# timeout_s 570.
set -uo pipefail
OUT_DIR=${1:-/tmp/gpu_check}
mkdir -p "$OUT_DIR"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1 FER_BENCH_CACHE_DIR=/tmp/fer_bench_cache
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
# 1. the throughput table (timm-style rows into benchmarks/results/throughput.csv, copied to $OUT)
timeout 240 python3 benchmarks/train_throughput.py --device cuda --steps 30 \
  --models vit_s16 vit_b16 swin_t swin_b --heads none all 2>&1 | tee "$OUT_DIR/throughput.log"
timeout 150 python3 benchmarks/train_throughput.py --device cuda --steps 30 --models vit_b16 swin_t --heads none \
  --compile vit_b16 swin_t 2>&1 | tee -a "$OUT_DIR/throughput.log"
cp benchmarks/results/throughput.csv "$OUT_DIR/" 2>/dev/null
# 2. a real recipe end to end through the cache, 2 minutes of training
timeout 210 python3 benchmarks/gpu_check.py recipe --minutes 2 --out "$OUT_DIR" 2>&1 | tail -5 | tee "$OUT_DIR/recipe.log"
# 3. DDP: 2 processes sharing the GPU (NCCL, else gloo on CUDA tensors) against one process
timeout 90 python3 benchmarks/gpu_check.py ddp --out "$OUT_DIR" 2>&1 | tail -3 | tee "$OUT_DIR/ddp.log"
# 4. faces: detection + alignment + ViT-B/16 on photos and a 720p video. MTCNN with its released weights (carried
# in .whl/weights); RetinaFace with random weights (its release file cannot be fetched offline): detection speed only.
FER_BENCH_WEIGHTS_DIR=$PWD/.whl/weights timeout 60 python3 benchmarks/faces_speed.py --device cuda --detector mtcnn \
  --photos 64 --frames 240 --batch 32 2>&1 | tee "$OUT_DIR/faces_speed.log"
timeout 45 python3 benchmarks/faces_speed.py --device cuda --detector retinaface --photos 64 --frames 240 --batch 32 \
  2>&1 | tee -a "$OUT_DIR/faces_speed.log"
