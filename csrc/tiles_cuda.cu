// CUDA kernels of hmtl's tile op: a grid-stride loop over output pixels, each thread moving one
// pixel's channels from the source tiles.h's source_run gives it. Checks and semantics are shared
// with the CPU kernels (tiles.h, tiles.cpp).
#include "tiles.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

namespace hmtl {

// E is an unsigned integer of the element's size: a shuffle only moves bits.
template <typename E>
__global__ void shuffle_kernel(const E* __restrict__ x, E* __restrict__ out, const int64_t* __restrict__ perm,
                               const int64_t* __restrict__ rot, int64_t n, int64_t c, int64_t h, int64_t w, Grid grid,
                               Strides xs, Strides os) {
  const int64_t total = n * h * w, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t j = idx % w, i = (idx / w) % h, img = idx / (h * w), g2 = grid.g * grid.g;
    const E* s = x + img * xs.n + source_run(i, j, grid, perm + img * g2, rot + img * g2, xs).start;
    E* d = out + img * os.n + i * os.h + j * os.w;
    for (int64_t ch = 0; ch < c; ++ch) d[ch * os.c] = s[ch * xs.c];
  }
}

__global__ void shuffle_normalize_kernel(const uint8_t* __restrict__ x, float* __restrict__ out,
                                         const int64_t* __restrict__ perm, const int64_t* __restrict__ rot, int64_t n,
                                         int64_t c, int64_t h, int64_t w, Grid grid, Strides xs, Strides os,
                                         Affine a) {
  const int64_t total = n * h * w, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t j = idx % w, i = (idx / w) % h, img = idx / (h * w), g2 = grid.g * grid.g;
    const uint8_t* s = x + img * xs.n + source_run(i, j, grid, perm + img * g2, rot + img * g2, xs).start;
    float* d = out + img * os.n + i * os.h + j * os.w;
    // Explicit rounding, no fused multiply-add: the result equals the CPU kernel's bit for bit.
    for (int64_t ch = 0; ch < c; ++ch)
      d[ch * os.c] = __fadd_rn(__fmul_rn(static_cast<float>(s[ch * xs.c]), a.scale[ch]), a.shift[ch]);
  }
}

constexpr int kThreads = 256;

static unsigned int blocks_for(int64_t pixels) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>((pixels + kThreads - 1) / kThreads, 1 << 16)));
}

at::Tensor shuffle_tiles_cuda(const at::Tensor& x, const at::Tensor& perm, const at::Tensor& rot) {
  const char* op = "shuffle_tiles";
  check_image(op, x);
  const Grid grid = check_tile_params(op, x.size(0), x.size(2), x.size(3), perm, rot, x.device());
  at::Tensor out = at::empty_like(x);
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  if (out.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(x.device());
  const auto p = perm.contiguous(), r = rot.contiguous();
  const auto launch = [&](auto zero) {
    using E = decltype(zero);
    shuffle_kernel<E><<<blocks_for(n * h * w), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        static_cast<const E*>(x.const_data_ptr()), static_cast<E*>(out.mutable_data_ptr()),
        p.const_data_ptr<int64_t>(), r.const_data_ptr<int64_t>(), n, c, h, w, grid, nchw_strides(x),
        nchw_strides(out));
  };
  switch (x.element_size()) {
    case 1: launch(uint8_t{}); break;
    case 2: launch(uint16_t{}); break;
    default: launch(uint32_t{}); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor shuffle_tiles_normalize_cuda(const at::Tensor& x, const at::Tensor& perm, const at::Tensor& rot,
                                        at::ArrayRef<double> mean, at::ArrayRef<double> std) {
  const char* op = "shuffle_tiles_normalize";
  const Affine a = check_normalize_args(op, x, mean, std);
  const Grid grid = check_tile_params(op, x.size(0), x.size(1), x.size(2), perm, rot, x.device());
  const int64_t n = x.size(0), h = x.size(1), w = x.size(2), c = x.size(3);
  at::Tensor out = at::empty({n, c, h, w}, x.options().dtype(at::kFloat), at::MemoryFormat::ChannelsLast);
  if (out.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(x.device());
  const auto p = perm.contiguous(), r = rot.contiguous();
  shuffle_normalize_kernel<<<blocks_for(n * h * w), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      x.const_data_ptr<uint8_t>(), out.mutable_data_ptr<float>(), p.const_data_ptr<int64_t>(),
      r.const_data_ptr<int64_t>(), n, c, h, w, grid, nhwc_strides(x), nchw_strides(out), a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(hmtl, CUDA, m) {
  m.impl("shuffle_tiles", &shuffle_tiles_cuda);
  m.impl("shuffle_tiles_normalize", &shuffle_tiles_normalize_cuda);
}

}  // namespace hmtl
