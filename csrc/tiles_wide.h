// The CUDA tile kernel for planes of contiguous rows (N x C x H x W with unit column stride),
// written as a block program that the CPU can run too: tiles_cuda.cu launches it, and tiles.cpp
// runs it block by block, thread by thread, so the tests check its indexing on any machine.
//
// One block moves one S x S square of one output tile (S = kWideSide<E>; the last square of a tile
// side is cut short). Phase 1: its threads read the square's source -- an S x S square of the
// source tile, wherever the turn puts it -- row by row, one W-byte word per thread, into shared
// memory. Phase 2: they write the output square row by row, W bytes per thread, each word gathered
// from shared memory in turned order. W is the widest of 16, 8, 4, 2, 1 bytes (at least one
// element) dividing every address and stride the block touches (wide_word_bytes): 16 for 224 px
// float32 or uint8 at g = 2, 8 for float32 and 2 for uint8 at g = 3 (tiles of 74 pixels).
// Pixels off the grid are copied by the caller.
#pragma once

#include "tiles.h"

#include <cstdint>
#include <type_traits>

namespace hmtl {

// The squares' side in elements (4.1 to 8.3 KiB of shared memory per block), and threads per block.
template <typename E>
constexpr int64_t kWideSide = sizeof(E) == 4 ? 32 : 64;
constexpr int kWideThreads = 256;

// One W-byte word: a CUDA vector type on the device (one wide load or store), the same layout on
// the host.
template <int W> struct WideWord;
#ifdef __CUDACC__
template <> struct WideWord<16> { using type = uint4; };
template <> struct WideWord<8> { using type = uint2; };
#else
template <> struct WideWord<16> { struct alignas(16) type { uint32_t x, y, z, w; }; };
template <> struct WideWord<8> { struct alignas(8) type { uint32_t x, y; }; };
#endif
template <> struct WideWord<4> { using type = uint32_t; };
template <> struct WideWord<2> { using type = uint16_t; };
template <> struct WideWord<1> { using type = uint8_t; };

// A word seen as its W / sizeof(E) elements.
template <typename E, int W>
union WideElements {
  typename WideWord<W>::type word;
  E e[W / sizeof(E)];
};

struct WidePlan {
  Grid grid;
  int64_t planes;   // C
  Strides xs, os;   // xs.w == os.w == 1
  int64_t squares;  // per tile side: ceil(t / S)
};

// Block b's square of output tile p: rows i0.. i1-1, columns j0.. j1-1 inside the tile, read
// from source tile q turned k, whose rows si0.. and columns sj0.. hold what it needs.
struct WideSquare {
  int64_t x0, o0;  // element offsets of the source tile's and the output tile's top-left pixels
  int64_t q, k;
  int64_t i0, i1, j0, j1;
  int64_t si0, sj0;
};

template <typename E>
C10_HOST_DEVICE inline WideSquare wide_square(int64_t b, const WidePlan& plan, const int64_t* perm,
                                              const int64_t* rot) {
  constexpr int64_t S = kWideSide<E>;
  const int64_t g = plan.grid.g, t = plan.grid.t, m = plan.squares, g2 = g * g;
  const int64_t col = b % m, row = (b / m) % m, p = (b / (m * m)) % g2;
  const int64_t plane = (b / (m * m * g2)) % plan.planes, img = b / (m * m * g2 * plan.planes);
  WideSquare s;
  s.q = perm[img * g2 + p];
  s.k = rot[img * g2 + p];
  s.x0 = img * plan.xs.n + plane * plan.xs.c + tile_offset(s.q, plan.grid, plan.xs);
  s.o0 = img * plan.os.n + plane * plan.os.c + tile_offset(p, plan.grid, plan.os);
  s.i0 = row * S;
  s.i1 = s.i0 + S < t ? s.i0 + S : t;
  s.j0 = col * S;
  s.j1 = s.j0 + S < t ? s.j0 + S : t;
  switch (s.k) {  // output (i, j) reads source (si, sj), as source_line has it
    case 0: s.si0 = s.i0, s.sj0 = s.j0; break;          // (i, j)
    case 1: s.si0 = s.j0, s.sj0 = t - s.i1; break;      // (j, t-1-i)
    case 2: s.si0 = t - s.i1, s.sj0 = t - s.j1; break;  // (t-1-i, t-1-j)
    default: s.si0 = t - s.j1, s.sj0 = s.i0; break;     // (t-1-j, i)
  }
  return s;
}

// Writes one word. On the device through __stcg (a store that bypasses L1: the block never reads
// it back), which keeps it one instruction: a plain assignment of a word gathered from shared
// memory compiled to one store per element.
template <int W, typename E>
C10_HOST_DEVICE inline void store_word(E* at, typename WideWord<W>::type w) {
#ifdef __CUDA_ARCH__
  __stcg(reinterpret_cast<typename WideWord<W>::type*>(at), w);
#else
  *reinterpret_cast<typename WideWord<W>::type*>(at) = w;
#endif
}

// Phase 1: thread `tid` of `threads` copies its words of the source square into `shared`
// (row r, column c at r * (S + 1) + c; the extra column spreads turned reads over the banks).
template <typename E, int W>
C10_HOST_DEVICE inline void wide_load(const WideSquare& s, const WidePlan& plan, const E* __restrict__ x,
                                      E* __restrict__ shared, int tid, int threads) {
  constexpr int S = kWideSide<E>, V = W / sizeof(E);
  const bool even = s.k % 2 == 0;
  const int rows = even ? s.i1 - s.i0 : s.j1 - s.j0, cols = even ? s.j1 - s.j0 : s.i1 - s.i0;
  const int words = cols / V;
  for (int u = tid; u < rows * words; u += threads) {  // 32-bit: GPUs emulate 64-bit division at length
    const int r = u / words, c = (u % words) * V;
    WideElements<E, W> v;
    v.word = *reinterpret_cast<const typename WideWord<W>::type*>(x + s.x0 + (s.si0 + r) * plan.xs.h + s.sj0 + c);
    for (int q = 0; q < V; ++q) shared[r * (S + 1) + c + q] = v.e[q];
  }
}

// Phase 2: thread `tid` of `threads` writes its words of the output square from `shared`.
template <typename E, int W>
C10_HOST_DEVICE inline void wide_store(const WideSquare& s, const WidePlan& plan, const E* __restrict__ shared,
                                       E* __restrict__ out, int tid, int threads) {
  constexpr int S = kWideSide<E>, V = W / sizeof(E);
  const int64_t t = plan.grid.t;
  const int words = (s.j1 - s.j0) / V;
  for (int u = tid; u < (s.i1 - s.i0) * words; u += threads) {
    const int64_t i = s.i0 + u / words, j = s.j0 + (u % words) * V;
    // Output row i read along the source tile as if shared memory held all of it, S + 1 apart.
    const Line line = source_line(s.k, i, t, S + 1, 1);
    const int64_t base = line.start - s.si0 * (S + 1) - s.sj0;
    WideElements<E, W> v;
    for (int q = 0; q < V; ++q) v.e[q] = shared[base + (j + q) * line.step];
    store_word<W>(out + s.o0 + i * plan.os.h + j, v.word);
  }
}

// The widest word, in bytes, dividing both base addresses, every stride of x and out and the tile
// side (so every square's rows and columns start on a word): 16, 8, 4, 2 or 1, at least one element.
inline int wide_word_bytes(const at::Tensor& x, const at::Tensor& out, Grid grid) {
  const int64_t e = x.element_size();
  uint64_t all = reinterpret_cast<uintptr_t>(x.const_data_ptr()) | reinterpret_cast<uintptr_t>(out.const_data_ptr());
  const Strides xs = nchw_strides(x), os = nchw_strides(out);
  for (int64_t v : {xs.n, xs.c, xs.h, os.n, os.c, os.h, grid.t}) all |= static_cast<uint64_t>(v * e);
  int w = 16;
  while (w > e && all % w != 0) w /= 2;
  return w;
}

inline WidePlan wide_plan(const at::Tensor& x, const at::Tensor& out, Grid grid, int64_t side) {
  return {grid, x.size(1), nchw_strides(x), nchw_strides(out), (grid.t + side - 1) / side};
}

inline int64_t wide_blocks(const at::Tensor& x, const WidePlan& plan) {
  return x.size(0) * plan.planes * plan.grid.g * plan.grid.g * plan.squares * plan.squares;
}

// Calls f(E{}, std::integral_constant<int, W>{}) for elements of `element` bytes and words of
// `word` bytes (word >= element, both powers of two up to 16).
template <typename F>
void with_wide_types(int64_t element, int word, const F& f) {
  const auto by_word = [&](auto zero) {
    using E = decltype(zero);
    if (word == 16) return f(zero, std::integral_constant<int, 16>{});
    if (word == 8) return f(zero, std::integral_constant<int, 8>{});
    if constexpr (sizeof(E) <= 4)
      if (word == 4) return f(zero, std::integral_constant<int, 4>{});
    if constexpr (sizeof(E) <= 2)
      if (word == 2) return f(zero, std::integral_constant<int, 2>{});
    if constexpr (sizeof(E) == 1)
      if (word == 1) return f(zero, std::integral_constant<int, 1>{});
    TORCH_CHECK(false, "shuffle_tiles: no ", word, "-byte words for ", sizeof(E), "-byte elements");
  };
  switch (element) {
    case 1: return by_word(uint8_t{});
    case 2: return by_word(uint16_t{});
    default: return by_word(uint32_t{});
  }
}

// The pixels off the grid (rows below it, columns right of it), copied by torch.
inline void copy_off_grid(const at::Tensor& x, const at::Tensor& out, Grid grid) {
  const int64_t span = grid.g * grid.t, h = x.size(2), w = x.size(3);
  if (span < h) out.narrow(2, span, h - span).copy_(x.narrow(2, span, h - span));
  if (span < w) out.narrow(2, 0, span).narrow(3, span, w - span).copy_(x.narrow(2, 0, span).narrow(3, span, w - span));
}

}  // namespace hmtl
