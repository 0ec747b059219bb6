// hmtl's tile op: a batched jigsaw shuffle with per-tile rotation (docs/method.md, section 4).
// This file holds the argument checks shared with the CUDA kernels, the CPU kernels, the operator
// schemas and the Python module. Fake implementations and the gradient are registered in
// hmtl_tiles.py, beside the PyTorch reference.
#include "tiles.h"

#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

namespace hmtl {

// ---------------------------------------------------------------------------- checks

static std::string row_text(const int64_t* row, int64_t len) {
  std::ostringstream s;
  s << "[";
  for (int64_t j = 0; j < len; ++j) s << (j ? ", " : "") << row[j];
  s << "]";
  return s.str();
}

Grid check_tile_params(const char* op, int64_t n, int64_t h, int64_t w, const at::Tensor& perm,
                       const at::Tensor& rot, const at::Device& device) {
  TORCH_CHECK_VALUE(perm.dim() == 2, op, ": perm must be N x g^2, got shape ", perm.sizes());
  TORCH_CHECK_VALUE(rot.sizes() == perm.sizes(), op, ": rot must have perm's shape ", perm.sizes(),
                    ", got ", rot.sizes());
  TORCH_CHECK_VALUE(perm.size(0) == n, op, ": perm has ", perm.size(0), " rows for ", n, " images");
  TORCH_CHECK_TYPE(perm.scalar_type() == at::kLong && rot.scalar_type() == at::kLong, op,
                   ": perm and rot must be int64, got ", perm.scalar_type(), " and ", rot.scalar_type());
  TORCH_CHECK_VALUE(perm.device() == device && rot.device() == device, op,
                    ": x, perm and rot must be on one device, got ", device, ", ", perm.device(), " and ",
                    rot.device());
  const int64_t g2 = perm.size(1);
  const auto g = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(g2))));
  TORCH_CHECK_VALUE(g2 > 0 && g * g == g2, op, ": perm has ", g2, " columns, which is not a square g^2");
  TORCH_CHECK_VALUE(g <= std::min(h, w), op, ": a ", g, "x", g, " grid does not fit a ", h, "x", w,
                    " image (tiles would be empty)");
  if (!perm.device().is_cpu()) return {g, std::min(h, w) / g};
  const auto p = perm.contiguous(), r = rot.contiguous();
  const int64_t* P = p.const_data_ptr<int64_t>();
  const int64_t* R = r.const_data_ptr<int64_t>();
  std::vector<char> seen(g2);
  for (int64_t i = 0; i < n; ++i) {
    std::fill(seen.begin(), seen.end(), 0);
    for (int64_t j = 0; j < g2; ++j) {
      const int64_t v = P[i * g2 + j];
      TORCH_CHECK_VALUE(v >= 0 && v < g2 && !seen[v]++, op, ": perm row ", i, " is not a permutation of 0..",
                        g2 - 1, ": ", row_text(P + i * g2, g2));
      TORCH_CHECK_VALUE(R[i * g2 + j] >= 0 && R[i * g2 + j] <= 3, op, ": rot[", i, ", ", j, "] = ",
                        R[i * g2 + j], " is outside 0..3");
    }
  }
  return {g, std::min(h, w) / g};
}

void check_image(const char* op, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be N x C x H x W, got shape ", x.sizes());
  const auto t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kByte || t == at::kHalf || t == at::kBFloat16 || t == at::kFloat, op,
                   ": x must be uint8, float16, bfloat16 or float32, got ", t);
}

Affine check_normalize_args(const char* op, const at::Tensor& x, at::ArrayRef<double> mean,
                            at::ArrayRef<double> std) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be N x H x W x C, got shape ", x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kByte, op, ": x must be uint8, got ", x.scalar_type());
  const int64_t channels = x.size(3);
  TORCH_CHECK_VALUE(channels <= kMaxChannels, op, ": at most ", kMaxChannels, " channels, got ", channels);
  TORCH_CHECK_VALUE(static_cast<int64_t>(mean.size()) == channels && static_cast<int64_t>(std.size()) == channels,
                    op, ": mean and std need one value per channel (", channels, "), got ", mean.size(), " and ",
                    std.size());
  Affine a{};
  for (int64_t c = 0; c < channels; ++c) {
    TORCH_CHECK_VALUE(std[c] > 0 && std::isfinite(std[c]) && std::isfinite(mean[c]), op,
                      ": need finite mean and std > 0, got mean ", mean[c], " and std ", std[c], " for channel ", c);
    a.scale[c] = static_cast<float>(1.0 / (255.0 * std[c]));
    a.shift[c] = static_cast<float>(-mean[c] / std[c]);
  }
  return a;
}

// ---------------------------------------------------------------------------- CPU kernels

// Calls row(dst, src, count, step) for every row of the output: `count` pixels, pixel j written at
// element offset dst + j * os.w of the output and read at src + j * step of the input (for channel
// 0; channel c lies c * os.c and c * xs.c further), the source of each row's first pixel found by
// source_run as the CUDA kernels find every pixel's. In parallel over images and tiles; the last
// task of each image copies the pixels off the grid.
template <typename Row>
static void for_each_row(int64_t n, int64_t h, int64_t w, Grid grid, const at::Tensor& perm, const at::Tensor& rot,
                         Strides xs, Strides os, const Row& row) {
  const int64_t g2 = grid.g * grid.g, t = grid.t, span = grid.g * grid.t;
  const auto p = perm.contiguous(), r = rot.contiguous();
  const int64_t* P = p.const_data_ptr<int64_t>();
  const int64_t* R = r.const_data_ptr<int64_t>();
  at::parallel_for(0, n * (g2 + 1), 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t img = task / (g2 + 1), pos = task % (g2 + 1), x0 = img * xs.n, o0 = img * os.n;
      const auto run = [&](int64_t i, int64_t j, int64_t count) {
        const Line src = source_run(i, j, grid, P + img * g2, R + img * g2, xs);
        row(o0 + i * os.h + j * os.w, x0 + src.start, count, src.step);
      };
      if (pos == g2) {  // off the grid: the part of each row right of it, and the rows below it whole
        for (int64_t i = 0; i < h; ++i) {
          const int64_t j = i < span ? span : 0;
          if (j < w) run(i, j, w - j);
        }
        continue;
      }
      for (int64_t i = 0; i < t; ++i) run(pos / grid.g * t + i, pos % grid.g * t, t);
    }
  });
}

// E is an unsigned integer of the element's size: a shuffle only moves bits.
template <typename E>
static void shuffle_cpu(const at::Tensor& x, const at::Tensor& perm, const at::Tensor& rot, const at::Tensor& out,
                        Grid grid) {
  const Strides xs = nchw_strides(x), os = nchw_strides(out);
  const E* X = static_cast<const E*>(x.const_data_ptr());
  E* O = static_cast<E*>(out.mutable_data_ptr());
  const int64_t channels = x.size(1);
  for_each_row(x.size(0), x.size(2), x.size(3), grid, perm, rot, xs, os,
               [&](int64_t dst, int64_t src, int64_t count, int64_t step) {
                 for (int64_t c = 0; c < channels; ++c) {
                   E* d = O + dst + c * os.c;
                   const E* s = X + src + c * xs.c;
                   if (os.w == 1 && step == 1) {
                     std::memcpy(d, s, count * sizeof(E));
                   } else {
                     for (int64_t j = 0; j < count; ++j) d[j * os.w] = s[j * step];
                   }
                 }
               });
}

at::Tensor shuffle_tiles_cpu(const at::Tensor& x, const at::Tensor& perm, const at::Tensor& rot) {
  const char* op = "shuffle_tiles";
  check_image(op, x);
  const Grid grid = check_tile_params(op, x.size(0), x.size(2), x.size(3), perm, rot, x.device());
  at::Tensor out = at::empty_like(x);
  switch (x.element_size()) {
    case 1: shuffle_cpu<uint8_t>(x, perm, rot, out, grid); break;
    case 2: shuffle_cpu<uint16_t>(x, perm, rot, out, grid); break;
    default: shuffle_cpu<uint32_t>(x, perm, rot, out, grid); break;
  }
  return out;
}

// No fused multiply-add (setup.py: -ffp-contract=off): the result equals the PyTorch reference's
// multiply, then add, bit for bit.
at::Tensor shuffle_tiles_normalize_cpu(const at::Tensor& x, const at::Tensor& perm, const at::Tensor& rot,
                                       at::ArrayRef<double> mean, at::ArrayRef<double> std) {
  const char* op = "shuffle_tiles_normalize";
  const Affine a = check_normalize_args(op, x, mean, std);
  const Grid grid = check_tile_params(op, x.size(0), x.size(1), x.size(2), perm, rot, x.device());
  at::Tensor out = at::empty({x.size(0), x.size(3), x.size(1), x.size(2)}, x.options().dtype(at::kFloat),
                             at::MemoryFormat::ChannelsLast);
  const Strides xs = nhwc_strides(x), os = nchw_strides(out);
  const uint8_t* X = x.const_data_ptr<uint8_t>();
  float* O = out.mutable_data_ptr<float>();
  const int64_t channels = x.size(3);
  for_each_row(x.size(0), x.size(1), x.size(2), grid, perm, rot, xs, os,
               [&](int64_t dst, int64_t src, int64_t count, int64_t step) {
                 for (int64_t j = 0; j < count; ++j)
                   for (int64_t c = 0; c < channels; ++c)
                     O[dst + j * os.w + c * os.c] =
                         static_cast<float>(X[src + j * step + c * xs.c]) * a.scale[c] + a.shift[c];
               });
  return out;
}

// ---------------------------------------------------------------------------- operators

TORCH_LIBRARY(hmtl, m) {
  m.def("shuffle_tiles(Tensor x, Tensor perm, Tensor rot) -> Tensor");
  m.def("shuffle_tiles_normalize(Tensor x, Tensor perm, Tensor rot, float[] mean, float[] std) -> Tensor");
}

TORCH_LIBRARY_IMPL(hmtl, CPU, m) {
  m.impl("shuffle_tiles", &shuffle_tiles_cpu);
  m.impl("shuffle_tiles_normalize", &shuffle_tiles_normalize_cpu);
}

}  // namespace hmtl

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hmtl's tile op; the operators live in torch.ops.hmtl";
#ifdef HMTL_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
