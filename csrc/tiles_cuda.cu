// CUDA kernels of hmtl's tile op. Planes of contiguous rows (N x C x H x W, the common case) take
// the square-by-square kernel of tiles_wide.h: wide loads into shared memory, wide stores out of
// it. Other layouts (channels-last, strided views) and the fused op take a grid-stride loop over
// output pixels, each thread moving one pixel's channels. Checks and semantics are shared with the
// CPU kernels (tiles.h, tiles.cpp); the functional ops (registered once, in tiles.cpp) call these.
#include "tiles.h"
#include "tiles_wide.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

namespace hmtl {

// Element offset (inside image `img`) of the source of output pixel (i, j).
__device__ __forceinline__ int64_t source_pixel(int64_t img, int64_t i, int64_t j, Grid grid,
                                                const int64_t* __restrict__ perm, const int64_t* __restrict__ rot,
                                                Strides xs) {
  const int64_t span = grid.g * grid.t;
  if (i >= span || j >= span) return i * xs.h + j * xs.w;
  const int64_t g2 = grid.g * grid.g, p = (i / grid.t) * grid.g + j / grid.t;
  const int64_t q = perm[img * g2 + p], k = rot[img * g2 + p];
  CUDA_KERNEL_ASSERT(q >= 0 && q < g2 && k >= 0 && k <= 3);  // check=false: never read out of bounds
  const Line line = source_line(k, i % grid.t, grid.t, xs.h, xs.w);
  return tile_offset(q, grid, xs) + line.start + (j % grid.t) * line.step;
}

// E is an unsigned integer of the element's size: shuffling only moves bits.
template <typename E>
__global__ void shuffle_kernel(const E* __restrict__ x, E* __restrict__ out, const int64_t* __restrict__ perm,
                               const int64_t* __restrict__ rot, int64_t n, int64_t c, int64_t h, int64_t w, Grid grid,
                               Strides xs, Strides os) {
  const int64_t total = n * h * w, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t j = idx % w, i = (idx / w) % h, img = idx / (h * w);
    const E* s = x + img * xs.n + source_pixel(img, i, j, grid, perm, rot, xs);
    E* d = out + img * os.n + i * os.h + j * os.w;
    for (int64_t ch = 0; ch < c; ++ch) d[ch * os.c] = s[ch * xs.c];
  }
}

// One block per S x S square of an output tile (tiles_wide.h): its source square into shared
// memory, then out, W bytes per load and store.
template <typename E, int W>
__global__ void __launch_bounds__(kWideThreads)
    shuffle_wide_kernel(const E* __restrict__ x, E* __restrict__ out, const int64_t* __restrict__ perm,
                        const int64_t* __restrict__ rot, WidePlan plan) {
  __shared__ E shared[kWideSide<E> * (kWideSide<E> + 1)];
  const WideSquare s = wide_square<E>(blockIdx.x, plan, perm, rot);
  CUDA_KERNEL_ASSERT(s.q >= 0 && s.q < plan.grid.g * plan.grid.g && s.k >= 0 && s.k <= 3);
  wide_load<E, W>(s, plan, x, shared, threadIdx.x, blockDim.x);
  __syncthreads();
  wide_store<E, W>(s, plan, shared, out, threadIdx.x, blockDim.x);
}

template <typename T>
__global__ void shuffle_normalize_kernel(const uint8_t* __restrict__ x, T* __restrict__ out,
                                         const int64_t* __restrict__ perm, const int64_t* __restrict__ rot, int64_t n,
                                         int64_t c, int64_t h, int64_t w, Grid grid, Strides xs, Strides os,
                                         Affine a) {
  const int64_t total = n * h * w, stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t j = idx % w, i = (idx / w) % h, img = idx / (h * w);
    const uint8_t* s = x + img * xs.n + source_pixel(img, i, j, grid, perm, rot, xs);
    T* d = out + img * os.n + i * os.h + j * os.w;
    // Explicit rounding: no fused multiply-add, so the result equals the CPU kernel's bit for bit.
    for (int64_t ch = 0; ch < c; ++ch)
      d[ch * os.c] = static_cast<T>(__fadd_rn(__fmul_rn(static_cast<float>(s[ch * xs.c]), a.scale[ch]), a.shift[ch]));
  }
}

// check=false: perm rows and rot values are checked on the device, without a synchronisation:
// a bad value stops the program with a device-side assert at the next synchronisation point.
static void check_values_async(const at::Tensor& perm, const at::Tensor& rot) {
  const auto ordered = std::get<0>(perm.sort(1));
  const auto identity = at::arange(perm.size(1), perm.options()).expand_as(perm);
  at::_assert_async(ordered.eq(identity).all().logical_and(rot.ge(0).all()).logical_and(rot.le(3).all()),
                    "hmtl tile op: a perm row is not a permutation of 0..g^2-1, or a rot value lies outside 0..3");
}

static unsigned int blocks_for(int64_t pixels, int threads) {
  return static_cast<unsigned int>(std::min<int64_t>((pixels + threads - 1) / threads, 1 << 16));
}

void shuffle_tiles_out_cuda(const at::Tensor& x, const at::Tensor& perm, const at::Tensor& rot, const at::Tensor& out,
                            bool check) {
  const char* op = "shuffle_tiles";
  check_image(op, x);
  const Grid grid = check_tile_params(op, x.size(0), x.size(2), x.size(3), perm, rot, x.device(), check);
  check_out(op, out, x.sizes(), x.scalar_type(), x);
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  if (!check) check_values_async(perm, rot);
  const auto p = perm.contiguous(), r = rot.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (x.stride(3) == 1 && out.stride(3) == 1) {
    with_wide_types(x.element_size(), wide_word_bytes(x, out, grid), [&](auto zero, auto word) {
      using E = decltype(zero);
      const WidePlan plan = wide_plan(x, out, grid, kWideSide<E>);
      const int64_t blocks = wide_blocks(x, plan);
      TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), op, ": ", blocks, " blocks are past CUDA's grid limit");
      shuffle_wide_kernel<E, decltype(word)::value><<<static_cast<unsigned int>(blocks), kWideThreads, 0, stream>>>(
          static_cast<const E*>(x.const_data_ptr()), static_cast<E*>(out.mutable_data_ptr()),
          p.const_data_ptr<int64_t>(), r.const_data_ptr<int64_t>(), plan);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    copy_off_grid(x, out, grid);
    return;
  }
  const int threads = 256;
  const auto launch = [&](auto zero) {
    using E = decltype(zero);
    shuffle_kernel<E><<<blocks_for(n * h * w, threads), threads, 0, stream>>>(
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
}

void shuffle_tiles_normalize_out_cuda(const at::Tensor& x, const at::Tensor& perm, const at::Tensor& rot,
                                      at::ArrayRef<double> mean, at::ArrayRef<double> std, const at::Tensor& out,
                                      bool check) {
  const char* op = "shuffle_tiles_normalize";
  check_normalize_input(op, x, out.scalar_type());
  const Grid grid = check_tile_params(op, x.size(0), x.size(1), x.size(2), perm, rot, x.device(), check);
  check_out(op, out, {x.size(0), x.size(3), x.size(1), x.size(2)}, out.scalar_type(), x);
  const Affine a = make_affine(op, x.size(3), mean, std);
  const int64_t n = x.size(0), h = x.size(1), w = x.size(2), c = x.size(3);
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  if (!check) check_values_async(perm, rot);
  const auto p = perm.contiguous(), r = rot.contiguous();
  const int threads = 256;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "shuffle_tiles_normalize", [&] {
    shuffle_normalize_kernel<scalar_t><<<blocks_for(n * h * w, threads), threads, 0,
                                         c10::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<uint8_t>(), out.mutable_data_ptr<scalar_t>(), p.const_data_ptr<int64_t>(),
        r.const_data_ptr<int64_t>(), n, c, h, w, grid, nhwc_strides(x), nchw_strides(out), a);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

TORCH_LIBRARY_IMPL(hmtl, CUDA, m) {
  m.impl("shuffle_tiles_out", &shuffle_tiles_out_cuda);
  m.impl("shuffle_tiles_normalize_out", &shuffle_tiles_normalize_out_cuda);
}

}  // namespace hmtl
