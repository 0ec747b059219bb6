#!/usr/bin/env bash
# The GPU check, on one CUDA GPU (about 8 minutes on an H100): builds the extension with CUDA against
# this machine's torch (installing nothing), runs the CUDA tests, runs SL and HMTL steps under
# torch.cuda.set_sync_debug_mode("error"), checks torch.compile of the deployable network, and times
# the training steps (ResNet50, 224 px, batch 64, bf16; and fp16 with the GradScaler) and the tile op.
# Its output ends in one block for docs/performance.md. Without a GPU it says so and exits 0.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]       # the log also goes to OUT_DIR/gpu_check.log
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.}
mkdir -p "$out"
exec > >(tee "$out/gpu_check.log") 2>&1
if ! python3 -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
  echo "gpu_check: no CUDA device here; nothing was checked"
  exit 0
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name())'
time python3 setup.py -q build_ext --inplace 2>&1 | grep -v -i "warning" | tail -5
python3 -c 'import torch, _hmtl_tiles; assert _hmtl_tiles.with_cuda, "built without CUDA"; print("built with CUDA")'
python3 -m pytest -q -p no:cacheprovider tests -k "cuda or gpu" 2>&1 | tail -15
python3 benchmarks/train_step.py --device cuda --batch-size 64 --amp bf16 --sync-check 50 --compile-check \
  --steps 10 --run-steps 10 --cache /tmp/hmtl-cache
python3 benchmarks/train_step.py --device cuda --batch-size 64 --amp fp16 --steps 10 --run-steps 10 \
  --cache /tmp/hmtl-cache
python3 benchmarks/tiles.py --device cuda --repeats 50
echo "gpu_check: done"
