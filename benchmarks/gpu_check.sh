#!/usr/bin/env bash
# Everything the README still lacks from a GPU, in one run (sized for ~10 minutes on one H200):
# build the extension with CUDA, run the CUDA tests, then print the tile op against a
# device-to-device copy (Python call and kernel alone), the SL and HMTL training steps against
# torchvision's (eager, torch.compile, CUDA graphs), and the loader with every core of the machine.
#
#     bash benchmarks/gpu_check.sh [AFLW2000 folder]      # the folder only for the loader figure
#
# A step that fails is reported and the rest still run; the exit status is that of the worst.
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
step() {
  echo "== $*"
  "$@" || { echo "== failed ($?): $*"; status=1; }
}

step python -m pip install --no-build-isolation -e . -q
step python -c 'import torch, hmtl_tiles; assert torch.cuda.is_available() and hmtl_tiles.with_cuda, "no GPU or no CUDA build"'
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
step python -m pytest -q tests/test_tiles.py -k cuda
step python -m pytest -q tests/test_training.py -k gpu
step python benchmarks/tiles.py --device cuda --rounds 2
step python benchmarks/train_step.py --device cuda --batch-size 64 --steps 20
if [ $# -ge 1 ]; then
  step python benchmarks/loading.py --root "$1" --workers "$(nproc)"
else
  echo "== loader figure skipped: give an AFLW2000 / 300W-LP folder as the argument"
fi
# Last, as the slowest to start (each compiles three ResNet50s): torch.compile, then CUDA graphs.
step python benchmarks/train_step.py --device cuda --batch-size 64 --steps 20 --compile
step python benchmarks/train_step.py --device cuda --batch-size 64 --steps 20 --compile reduce-overhead
exit $status
