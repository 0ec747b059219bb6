// hmtl's tile op: batched jigsaw shuffle + per-tile rotation (docs/method.md, section 4).
// This file holds the argument checks shared with the CUDA kernel, the CPU kernels
// (parallel over images and bands of tiles, with SIMD transposes on x86-64), the operator
// schemas and the pybind11 module.
#include "tiles.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <atomic>
#include <c10/util/StringUtil.h>
#include <cmath>
#include <string>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <type_traits>
#include <vector>

#include "tiles_simd.h"
#include "tiles_wide.h"

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
                       const at::Tensor& rot, const at::Device& device, bool values) {
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

  if (!values) return {g, std::min(h, w) / g};
  // Values are checked on the host: a bad row must never reach a kernel.
  const auto p = perm.to(at::kCPU).contiguous(), r = rot.to(at::kCPU).contiguous();
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

void check_out(const char* op, const at::Tensor& out, at::IntArrayRef shape, at::ScalarType dtype,
               const at::Tensor& x) {
  TORCH_CHECK_VALUE(out.sizes() == shape, op, ": out must have shape ", shape, ", got ", out.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == dtype, op, ": out must be ", dtype, ", got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.device() == x.device(), op, ": out must be on ", x.device(), ", got ", out.device());
  at::assert_no_internal_overlap(out);
  at::assert_no_overlap(out, x);
}

void check_image(const char* op, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be N x C x H x W, got shape ", x.sizes());
  const auto t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kByte || t == at::kHalf || t == at::kBFloat16 || t == at::kFloat, op,
                   ": x must be uint8, float16, bfloat16 or float32, got ", t);
}

void check_normalize_input(const char* op, const at::Tensor& x, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be N x H x W x C, got shape ", x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kByte, op, ": x must be uint8, got ", x.scalar_type());
  TORCH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat, op,
                   ": the output dtype must be float32, bfloat16 or float16, got ", dtype);
}

Affine make_affine(const char* op, int64_t channels, at::ArrayRef<double> mean, at::ArrayRef<double> std) {
  TORCH_CHECK_VALUE(channels <= kMaxChannels, op, ": at most ", kMaxChannels, " channels, got ", channels);
  TORCH_CHECK_VALUE(static_cast<int64_t>(mean.size()) == channels && static_cast<int64_t>(std.size()) == channels,
                    op, ": mean and std need one value per channel (", channels, "), got ", mean.size(), " and ",
                    std.size());
  Affine a{};
  for (int64_t c = 0; c < channels; ++c) {
    TORCH_CHECK_VALUE(std[c] > 0 && std::isfinite(std[c]) && std::isfinite(mean[c]), op,
                      ": need finite mean and std > 0, got mean ", mean[c], " and std ", std[c],
                      " for channel ", c);
    a.scale[c] = static_cast<float>(1.0 / (255.0 * std[c]));
    a.shift[c] = static_cast<float>(-mean[c] / std[c]);
  }
  return a;
}

// ---------------------------------------------------------------------------- CPU kernels

// Prefetches the source row of a tile that an output row reads whole (0° or 180°): `count`
// pixels, pixel j at element offset line.start + j*line.step of `tile`.
static inline void prefetch_row(const void* tile, Line line, int64_t count, int64_t element) {
  const int64_t low = line.start + std::min<int64_t>(0, (count - 1) * line.step);
  prefetch(static_cast<const char*>(tile) + low * element, count * std::abs(line.step) * element);
}

// The general traversal, for any layout: the fused op, channels-last batches and strided
// views. (Planes of contiguous rows, shuffle_tiles' common case, take shuffle_rows.)
// Calls seg(dst, src, count, src_step, plane) for every row segment of the output:
// `count` pixels, pixel j written at element offset dst + j*os.w of out and read at
// src + j*src_step of x. Runs in parallel over (image, plane, band of tile rows) and
// walks each band in output order, a whole row at a time: measured on a 2-core EPYC,
// that order is what keeps unrotated tiles at the speed of a plain copy (tile by tile
// is twice as slow). Channels-last outputs are visited as one plane of m = C elements
// per pixel, other layouts one channel plane (m = 1) at a time.
//
// Source rows that are read whole (tiles turned 0° or 180°) are prefetched kPrefetchRows ahead;
// rows read across (90°, 270°) gained nothing from prefetching and are left to the hardware.
template <typename Segment>
static void for_each_segment(int64_t n, int64_t planes, int64_t h, int64_t w, Grid grid, const at::Tensor& perm,
                             const at::Tensor& rot, const at::Tensor& x, Strides xs, Strides os, const Segment& seg) {
  const auto* x_bytes = static_cast<const char*>(x.const_data_ptr());
  const int64_t element = x.element_size();
  const int64_t g = grid.g, t = grid.t, g2 = g * g, span = g * t;
  const int64_t bands = g + (span < h ? 1 : 0);  // the last band holds the rows below the grid
  const auto p = perm.contiguous(), r = rot.contiguous();
  const int64_t* P = p.const_data_ptr<int64_t>();
  const int64_t* R = r.const_data_ptr<int64_t>();
  at::parallel_for(0, n * planes * bands, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t band = task % bands, plane = (task / bands) % planes, img = task / (bands * planes);
      const int64_t x0 = img * xs.n + plane * xs.c, o0 = img * os.n + plane * os.c;
      if (band == g) {
        for (int64_t i = span; i < h; ++i) seg(o0 + i * os.h, x0 + i * xs.h, w, xs.w, plane);
        continue;
      }
      const int64_t* Pb = P + img * g2 + band * g;
      const int64_t* Rb = R + img * g2 + band * g;
      for (int64_t i = 0; i < t; ++i) {
        const int64_t o = o0 + (band * t + i) * os.h;
        for (int64_t pc = 0; pc < g; ++pc) {
          const Line line = source_line(Rb[pc], i, t, xs.h, xs.w);
          const int64_t tile = x0 + tile_offset(Pb[pc], grid, xs);
          if (i + kPrefetchRows < t && (Rb[pc] == 0 || Rb[pc] == 2))
            prefetch_row(x_bytes + tile * element, source_line(Rb[pc], i + kPrefetchRows, t, xs.h, xs.w), t, element);
          seg(o + pc * t * os.w, tile + line.start, t, line.step, plane);
        }
        if (span < w) seg(o + span * os.w, x0 + (band * t + i) * xs.h + span * xs.w, w - span, xs.w, plane);
      }
    }
  });
}

// Moves `count` pixels of m elements from s (pixel j at s + j*sstep, channel c at c*xc)
// to d (pixel j at d + j*dstep, channel c at c*oc). E is an unsigned integer of the
// element's size: shuffling only moves bits. CC > 0 fixes m at compile time.
template <typename E, int CC>
static void move_pixels(E* __restrict__ d, int64_t dstep, int64_t oc, const E* __restrict__ s, int64_t sstep,
                        int64_t xc, int64_t count, int64_t m) {
  if (CC > 0) m = CC;
  if (m == 1 && dstep == 1) {
    if (sstep == 1) {
      std::memcpy(d, s, count * sizeof(E));
    } else if (sstep == -1) {  // a row reversed (rot 180)
      Portable::reverse(d, s, count);
    } else {
      for (int64_t j = 0; j < count; ++j) d[j] = s[j * sstep];
    }
  } else if (xc == 1 && oc == 1 && sstep == m && dstep == m) {
    std::memcpy(d, s, count * m * sizeof(E));
  } else {
    for (int64_t j = 0; j < count; ++j)
      for (int64_t c = 0; c < m; ++c) d[j * dstep + c * oc] = s[j * sstep + c * xc];
  }
}

// ---------------------------------------------------------------------------- CPU kernels: contiguous rows
// tiles_rows.inc compiled once per instruction set; shuffle_cpu picks one from the CPU's features.

namespace portable {
using Isa = Portable;
#include "tiles_rows.inc"
}  // namespace portable

#ifdef HMTL_X86
#pragma GCC push_options
#pragma GCC target("avx2")
namespace avx2 {
using Isa = Avx2;
#include "tiles_rows.inc"
}  // namespace avx2
#pragma GCC pop_options
#endif

// The instruction sets the CPU kernel for contiguous rows can run with here, best first; the
// one it runs with (the best, unless set_cpu_kernel_isa chose another: tests and benchmarks).
// (AVX-512 versions of tiles_simd.h's blocks -- 16 x 16 transposes, masked copies -- measured
// slower than the AVX2 ones on an AVX-512 AMD EPYC, so AVX-512 CPUs run the AVX2 code. Byte
// transposes by two rounds of AVX-512 VBMI byte permutes, 1.4-2.2x as fast as the SSE2 rounds in a
// stand-alone loop, made the kernel only ~5% faster on uint8 tiles turned 90°: not kept. Nor were
// 64-byte moves of rows of 65-128 bytes: no steady gain on a Zen 5 EPYC, slower warm at g = 3.)
enum class CpuIsa { kAvx2, kPortable };
static const char* const kIsaNames[] = {"avx2", "portable"};

static std::vector<CpuIsa> cpu_isas() {
  std::vector<CpuIsa> found;
#ifdef HMTL_X86
  if (cpu_has_avx2()) found.push_back(CpuIsa::kAvx2);
#endif
  found.push_back(CpuIsa::kPortable);
  return found;
}

static std::atomic<CpuIsa> g_isa{cpu_isas().front()};

std::vector<std::string> available_cpu_kernel_isas() {
  std::vector<std::string> names;
  for (CpuIsa isa : cpu_isas()) names.emplace_back(kIsaNames[static_cast<int>(isa)]);
  return names;
}

std::string cpu_kernel_isa() { return kIsaNames[static_cast<int>(g_isa.load())]; }

void set_cpu_kernel_isa(const std::string& name) {
  for (CpuIsa isa : cpu_isas())
    if (name == kIsaNames[static_cast<int>(isa)]) return g_isa.store(isa);
  TORCH_CHECK_VALUE(false, "this CPU cannot run the tile kernel's ", name, " code; it can run: ",
                    c10::Join(", ", available_cpu_kernel_isas()));
}

template <typename E>
static void shuffle_cpu(const at::Tensor& x, const at::Tensor& perm, const at::Tensor& rot, const at::Tensor& out,
                        Grid grid) {
  const int64_t C = x.size(1);
  const Strides xs = nchw_strides(x), os = nchw_strides(out);
  const E* xp = static_cast<const E*>(x.const_data_ptr());
  E* op = static_cast<E*>(out.mutable_data_ptr());
  if (xs.w == 1 && os.w == 1) {
    switch (g_isa.load()) {
#ifdef HMTL_X86
      case CpuIsa::kAvx2: return avx2::shuffle_rows<E>(x, perm, rot, out, grid);
#endif
      default: return portable::shuffle_rows<E>(x, perm, rot, out, grid);
    }
  }
  const bool interleaved = os.c == 1 && C > 1;
  const int64_t planes = interleaved ? 1 : C, m = interleaved ? C : 1;
  const auto run = [&](auto cc) {
    for_each_segment(x.size(0), planes, x.size(2), x.size(3), grid, perm, rot, x, xs, os,
                     [&](int64_t dst, int64_t src, int64_t count, int64_t step, int64_t) {
                       move_pixels<E, decltype(cc)::value>(op + dst, os.w, os.c, xp + src, step, xs.c, count, m);
                     });
  };
  if (m == 3)
    run(std::integral_constant<int, 3>{});
  else
    run(std::integral_constant<int, 0>{});
}

// CC > 0 fixes the channels per visited pixel at compile time (channels-last RGB).
template <typename T, int CC>
static void shuffle_normalize_cpu(const at::Tensor& x, const at::Tensor& perm, const at::Tensor& rot,
                                  const at::Tensor& out, Grid grid, const Affine& a) {
  const int64_t C = x.size(3);
  const Strides xs = nhwc_strides(x), os = nchw_strides(out);
  const uint8_t* xp = x.const_data_ptr<uint8_t>();
  T* op = static_cast<T*>(out.mutable_data_ptr());
  const bool interleaved = os.c == 1 && C > 1;
  const int64_t planes = interleaved ? 1 : C, m = CC > 0 ? CC : (interleaved ? C : 1);
  for_each_segment(x.size(0), planes, x.size(1), x.size(2), grid, perm, rot, x, xs, os,
                   [&](int64_t dst, int64_t src, int64_t count, int64_t step, int64_t plane) {
                     const uint8_t* s = xp + src;
                     T* d = op + dst;
                     for (int64_t j = 0; j < count; ++j, s += step, d += os.w)
                       for (int64_t c = 0; c < m; ++c)
                         d[c * os.c] =
                             static_cast<T>(static_cast<float>(s[c * xs.c]) * a.scale[plane + c] + a.shift[plane + c]);
                   });
}

// ---------------------------------------------------------------------------- the CUDA kernel's block program, on the CPU

// Runs tiles_wide.h's block program as the CUDA kernel does, block after block, each phase thread
// after thread, into `out` (N x C x H x W with unit column strides); returns the word width it
// chose. For tests: the indexing of the GPU kernel, checked on any machine.
int64_t wide_kernel_on_cpu(const at::Tensor& x, const at::Tensor& perm, const at::Tensor& rot, const at::Tensor& out) {
  const char* op = "wide_kernel_on_cpu";
  check_image(op, x);
  const Grid grid = check_tile_params(op, x.size(0), x.size(2), x.size(3), perm, rot, x.device());
  check_out(op, out, x.sizes(), x.scalar_type(), x);
  TORCH_CHECK_VALUE(x.stride(3) == 1 && out.stride(3) == 1, op, ": rows must be contiguous");
  const int word = wide_word_bytes(x, out, grid);
  const auto p = perm.contiguous(), r = rot.contiguous();
  with_wide_types(x.element_size(), word, [&](auto zero, auto w) {
    using E = decltype(zero);
    constexpr int W = decltype(w)::value;
    const WidePlan plan = wide_plan(x, out, grid, kWideSide<E>);
    std::vector<E> shared(kWideSide<E> * (kWideSide<E> + 1));
    for (int64_t b = 0; b < wide_blocks(x, plan); ++b) {
      const WideSquare s = wide_square<E>(b, plan, p.const_data_ptr<int64_t>(), r.const_data_ptr<int64_t>());
      for (int tid = 0; tid < kWideThreads; ++tid)
        wide_load<E, W>(s, plan, static_cast<const E*>(x.const_data_ptr()), shared.data(), tid, kWideThreads);
      for (int tid = 0; tid < kWideThreads; ++tid)
        wide_store<E, W>(s, plan, shared.data(), static_cast<E*>(out.mutable_data_ptr()), tid, kWideThreads);
    }
  });
  copy_off_grid(x, out, grid);
  return word;
}

// ---------------------------------------------------------------------------- operators
// Each op has an in-place `_out` form that writes into a preallocated `out` and returns
// nothing (the form torch.library can functionalize), with one kernel per device, and a
// functional form registered once for every device: it allocates `out` and calls the `_out`
// form through the dispatcher. `check` = false lets a GPU skip the host check of perm and rot
// (a synchronisation); the CPU, where it costs nothing, always checks.

void shuffle_tiles_out_cpu(const at::Tensor& x, const at::Tensor& perm, const at::Tensor& rot, const at::Tensor& out,
                           bool /*check*/) {
  const char* op = "shuffle_tiles";
  check_image(op, x);
  const Grid grid = check_tile_params(op, x.size(0), x.size(2), x.size(3), perm, rot, x.device());
  check_out(op, out, x.sizes(), x.scalar_type(), x);
  switch (x.element_size()) {
    case 1: shuffle_cpu<uint8_t>(x, perm, rot, out, grid); break;
    case 2: shuffle_cpu<uint16_t>(x, perm, rot, out, grid); break;
    default: shuffle_cpu<uint32_t>(x, perm, rot, out, grid); break;
  }
}

void shuffle_tiles_normalize_out_cpu(const at::Tensor& x, const at::Tensor& perm, const at::Tensor& rot,
                                     at::ArrayRef<double> mean, at::ArrayRef<double> std, const at::Tensor& out,
                                     bool /*check*/) {
  const char* op = "shuffle_tiles_normalize";
  check_normalize_input(op, x, out.scalar_type());
  const Grid grid = check_tile_params(op, x.size(0), x.size(1), x.size(2), perm, rot, x.device());
  check_out(op, out, {x.size(0), x.size(3), x.size(1), x.size(2)}, out.scalar_type(), x);
  const Affine a = make_affine(op, x.size(3), mean, std);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "shuffle_tiles_normalize", [&] {
    if (x.size(3) == 3 && out.stride(1) == 1)
      shuffle_normalize_cpu<scalar_t, 3>(x, perm, rot, out, grid, a);
    else
      shuffle_normalize_cpu<scalar_t, 0>(x, perm, rot, out, grid, a);
  });
}

static at::Tensor shuffle_tiles(const at::Tensor& x, const at::Tensor& perm, const at::Tensor& rot, bool check) {
  check_image("shuffle_tiles", x);
  at::Tensor out = at::empty_like(x);
  static const auto out_op = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("hmtl::shuffle_tiles_out", "")
                                 .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                             const at::Tensor&, bool)>();
  out_op.call(x, perm, rot, out, check);
  return out;
}

static at::Tensor shuffle_tiles_normalize(const at::Tensor& x, const at::Tensor& perm, const at::Tensor& rot,
                                          at::ArrayRef<double> mean, at::ArrayRef<double> std,
                                          at::ScalarType dtype, bool channels_last, bool check) {
  check_normalize_input("shuffle_tiles_normalize", x, dtype);
  at::Tensor out = at::empty({x.size(0), x.size(3), x.size(1), x.size(2)}, x.options().dtype(dtype),
                             channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  static const auto out_op = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("hmtl::shuffle_tiles_normalize_out", "")
                                 .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                             at::ArrayRef<double>, at::ArrayRef<double>, const at::Tensor&, bool)>();
  out_op.call(x, perm, rot, mean, std, out, check);
  return out;
}

TORCH_LIBRARY(hmtl, m) {
  m.def("shuffle_tiles(Tensor x, Tensor perm, Tensor rot, bool check=True) -> Tensor");
  m.def("shuffle_tiles_out(Tensor x, Tensor perm, Tensor rot, Tensor(a!) out, bool check=True) -> ()");
  m.def(
      "shuffle_tiles_normalize(Tensor x, Tensor perm, Tensor rot, float[] mean, float[] std, "
      "ScalarType dtype, bool channels_last, bool check=True) -> Tensor");
  m.def(
      "shuffle_tiles_normalize_out(Tensor x, Tensor perm, Tensor rot, float[] mean, float[] std, "
      "Tensor(a!) out, bool check=True) -> ()");
}

TORCH_LIBRARY_IMPL(hmtl, CompositeExplicitAutograd, m) {
  m.impl("shuffle_tiles", &shuffle_tiles);
  m.impl("shuffle_tiles_normalize", &shuffle_tiles_normalize);
}

TORCH_LIBRARY_IMPL(hmtl, CPU, m) {
  m.impl("shuffle_tiles_out", &shuffle_tiles_out_cpu);
  m.impl("shuffle_tiles_normalize_out", &shuffle_tiles_normalize_out_cpu);
}

}  // namespace hmtl

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hmtl's tile op; the operators live in torch.ops.hmtl";
  m.def("cpu_kernel_isa", &hmtl::cpu_kernel_isa,
        "the instruction set the CPU kernel for contiguous rows runs with: avx2 or portable");
  m.def("available_cpu_kernel_isas", &hmtl::available_cpu_kernel_isas,
        "the instruction sets this CPU can run the kernel with, best (the default) first");
  m.def("set_cpu_kernel_isa", &hmtl::set_cpu_kernel_isa,
        "run the CPU kernel with another instruction set this CPU has (tests and benchmarks)");
  m.def("wide_kernel_on_cpu", &hmtl::wide_kernel_on_cpu,
        "the CUDA kernel's block program run on the CPU into `out`; returns its word width in bytes (tests)",
        pybind11::arg("x"), pybind11::arg("perm"), pybind11::arg("rot"), pybind11::arg("out"));
#ifdef HMTL_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
