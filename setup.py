"""Builds hmtl's tile-op extension (csrc/) and installs hmtl.py as a module.

    pip install --no-build-isolation -e .

The CPU kernel is always built; the CUDA kernel too when a CUDA toolkit is found
(CUDA_HOME, CUDA_PATH, nvcc on PATH, or /usr/local/cuda). HMTL_CPU_ONLY=1 forces a
CPU-only build. TORCH_CUDA_ARCH_LIST is honoured; with no GPU visible it defaults to
DEFAULT_ARCHS. HMTL_DEBUG=0/1 drops/keeps debug symbols (default: dropped).
"""
import os
import shutil
from pathlib import Path

from setuptools import setup

# Turing (T4), Ampere (A100; its code also runs on 8.6/8.9), Hopper, and PTX that newer GPUs JIT.
DEFAULT_ARCHS = "7.5;8.0;9.0+PTX"


def find_cuda_home():
    """A CUDA toolkit directory holding include/cuda_runtime.h, or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime.h").is_file():
            return c
    return None


cuda_home = None if os.environ.get("HMTL_CPU_ONLY", "0") == "1" else find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import

import torch  # noqa: E402  (after CUDA_HOME is settled)
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

with_cuda = cuda_home is not None and torch.version.cuda is not None
if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
    os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS

debug = ["-g"] if os.environ.get("HMTL_DEBUG", "0") == "1" else ["-g0"]
# OpenMP: at::parallel_for runs serially without it. No fused multiply-add: the fused op's
# arithmetic must match the PyTorch reference bit for bit.
cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off", *debug]
sources = ["csrc/tiles.cpp"]
if with_cuda:
    extension = CUDAExtension(
        "_hmtl_tiles",
        sources + ["csrc/tiles_cuda.cu"],
        define_macros=[("HMTL_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
        extra_link_args=["-fopenmp"],
    )
else:
    extension = CppExtension("_hmtl_tiles", sources, extra_compile_args={"cxx": cxx_flags},
                             extra_link_args=["-fopenmp"])
print(f"hmtl: building the tile op for CPU{' and CUDA (' + cuda_home + ')' if with_cuda else ' only'}")

setup(
    name="hmtl",
    version="0.1.0",
    description="Hybrid Multi-Task Learning for fine-grained head pose estimation (reference implementation)",
    py_modules=["hmtl", "hmtl_data", "hmtl_flags", "hmtl_runs", "hmtl_tiles", "hmtl_use"],
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "numpy",
        "pillow",
        "scipy",
        "h5py",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest>=7.3", "pytest-xdist", "hypothesis", "onnx", "onnxruntime"],
        "export": ["onnx", "onnxruntime"],
    },
)
