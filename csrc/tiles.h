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

// The source of output pixel (i, j) of an image whose tiles are given by `perm` and `rot` (that
// image's rows): its element offset inside the image and plane, and the step to the source of
// (i, j + 1) while in the same tile. Both kernels call it: the CPU one per row, the CUDA one per
// pixel. A value out of range is clamped into it, so that a bad perm or rot on a GPU (whose
// values are not read back to be checked) can never make a kernel read outside the image.
C10_HOST_DEVICE inline Line source_run(int64_t i, int64_t j, Grid grid, const int64_t* perm, const int64_t* rot,
                                       Strides s) {
  const int64_t span = grid.g * grid.t, g2 = grid.g * grid.g;
  if (i >= span || j >= span) return {i * s.h + j * s.w, s.w};  // off the grid: copied
  const int64_t p = (i / grid.t) * grid.g + j / grid.t;
  const int64_t q = perm[p] < 0 ? 0 : perm[p] >= g2 ? g2 - 1 : perm[p];
  const Line line = source_line(rot[p] & 3, i % grid.t, grid.t, s.h, s.w);
  return {tile_offset(q, grid, s) + line.start + (j % grid.t) * line.step, line.step};
}

// Checks perm and rot against a batch of n images of h x w pixels on `device`: shapes, dtypes and
// devices; for CPU tensors also that each perm row is a permutation and each rot lies in 0..3. The
// values of GPU tensors are not copied back to be checked (that would make the host wait for the
// GPU): their drawer validates them, and source_run keeps a bad one inside the image. Raises
// ValueError / TypeError naming the problem.
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
