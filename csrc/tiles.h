// Shared by the CPU (tiles.cpp) and CUDA (tiles_cuda.cu) kernels of hmtl's tile op.
// Semantics: docs/method.md, section 4. A g x g grid of t x t tiles, t = min(H, W) / g, covers
// the top-left g*t x g*t pixels; out tile p = rot90(x tile perm[p], rot[p]), and every
// pixel outside the grid is copied unchanged.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

namespace hmtl {

struct Grid {
  int64_t g;  // tiles per side
  int64_t t;  // tile side in pixels
};

// Element strides of an image batch seen as N x C x H x W.
struct Strides {
  int64_t n, c, h, w;
};

inline Strides nchw_strides(const at::Tensor& x) { return {x.stride(0), x.stride(1), x.stride(2), x.stride(3)}; }

// A batch stored N x H x W x C (decoded images) seen as N x C x H x W.
inline Strides nhwc_strides(const at::Tensor& x) { return {x.stride(0), x.stride(3), x.stride(1), x.stride(2)}; }

// Row i of an output tile turned by k reads its source tile along one line: pixel j of the
// row is at `start + j * step` (element offsets inside the tile). From torch.rot90(tile, k,
// dims=(-2, -1)): out[i][j] = src[si][sj] with
//   k=0: (i, j)   k=1: (j, t-1-i)   k=2: (t-1-i, t-1-j)   k=3: (t-1-j, i).
struct Line {
  int64_t start, step;
};

C10_HOST_DEVICE inline Line source_line(int64_t k, int64_t i, int64_t t, int64_t row, int64_t col) {
  switch (k) {
    case 0: return {i * row, col};
    case 1: return {(t - 1 - i) * col, row};
    case 2: return {(t - 1 - i) * row + (t - 1) * col, -col};
    default: return {(t - 1) * row + i * col, -row};
  }
}

// Element offset, inside its image and plane, of the top-left pixel of tile q (row-major).
C10_HOST_DEVICE inline int64_t tile_offset(int64_t q, Grid grid, Strides s) {
  return (q / grid.g) * grid.t * s.h + (q % grid.g) * grid.t * s.w;
}

// Checks perm and rot against a batch of n images of h x w pixels on `device`: shapes, dtypes,
// devices, and that each perm row is a permutation and each rot lies in 0..3 (on the host, so
// that a bad value never reaches a kernel). Raises ValueError / TypeError naming the problem.
Grid check_tile_params(const char* op, int64_t n, int64_t h, int64_t w, const at::Tensor& perm,
                       const at::Tensor& rot, const at::Device& device);

// shuffle_tiles' batch: N x C x H x W, uint8 / float16 / bfloat16 / float32.
void check_image(const char* op, const at::Tensor& x);

// The fused op's per-channel map out = float(x) * scale[c] + shift[c], with scale = 1 / (255 std)
// and shift = -mean / std, i.e. (x / 255 - mean) / std; its input is uint8 N x H x W x C.
constexpr int64_t kMaxChannels = 64;
struct Affine {
  float scale[kMaxChannels];
  float shift[kMaxChannels];
};
Affine check_normalize_args(const char* op, const at::Tensor& x, at::ArrayRef<double> mean,
                            at::ArrayRef<double> std);

}  // namespace hmtl
