// SIMD building blocks of hmtl's CPU tile kernel (tiles.cpp). They move bits only -- a float is
// never computed on -- so every element is handled as an unsigned integer E of its size (1, 2
// or 4 bytes). Two instruction sets, chosen at run time from the CPU's features:
//
//   Portable  plain C++, any CPU
//   Avx2      x86-64 with AVX2 (also on AVX-512 CPUs: AVX-512 versions measured slower, tiles.cpp)
//
// Each provides, for E of 1, 2 and 4 bytes:
//   copy(d, s, n)                 d[j] = s[j]     for j < n   (a tile row turned 0°)
//   reverse(d, s, n)              d[j] = s[-j]    for j < n   (a tile row turned 180°)
//   vectors_for(bytes)            V > 0 where a row of that many bytes takes exactly V vectors and
//                                 the fixed-length forms below pay, else 0
//   copy_vectors<V>(d, s, n)      copy / reverse of a row of V vectors, unrolled: copy's branches
//   reverse_vectors<V>(d, s, n)   on a run-time length kept uint8 tiles at ~3x copy_ (fill_rows)
//   block<E>                      the side, in elements, of its square transposes
//   transpose(d, dh, s, sh, flip) one block x block transpose: d[c*dh + j] = s[j*sh + c],
//                                 the rows of d in reverse order when flip (tiles turned 90°, 270°)
// Vector loops end with one vector that overlaps the previous instead of a scalar remainder; it
// rewrites a few elements with the values they already hold.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)  // tiles.cpp needs GCC's target pragma
#define HMTL_X86 1
#include <immintrin.h>
#endif

namespace hmtl {

// Rows of tiles turned 0° or 180° come from g places at once: fetching each source row this many
// rows ahead took those tiles from ~1.8x to ~1.25x a plain copy (AVX2 EPYC, float32, measured);
// rows of bytes go 4x as far ahead (uint8 tiles turned 0°, g = 3, out of cache: 1.62x -> 1.50x).
// 8 and 16 rows measured no better on a 2-core Zen 5 EPYC, 16 worse for bytes (builds run by turns).
constexpr int64_t kPrefetchRows = 4;

// Asks for the cache lines of the `bytes` bytes from p on.
inline void prefetch(const void* p, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(static_cast<const char*>(p) + b);
}

// Asks for the cache lines of the `bytes` bytes from p on, to be written.
inline void prefetch_for_write(void* p, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(static_cast<char*>(p) + b, 1);
}

// ---------------------------------------------------------------------------- portable

struct Portable {
  template <typename E>
  static constexpr int64_t block = 8;

  template <typename E>
  static void copy(E* __restrict__ d, const E* __restrict__ s, int64_t n) {
    std::memcpy(d, s, n * sizeof(E));
  }

  template <typename E>
  static void reverse(E* __restrict__ d, const E* __restrict__ s, int64_t n) {
    for (int64_t j = 0; j < n; ++j) d[j] = s[-j];
  }

  static constexpr int vectors_for(int64_t /*bytes*/) { return 0; }

  template <int V, typename E>
  static void copy_vectors(E* d, const E* s, int64_t n) {
    copy(d, s, n);
  }

  template <int V, typename E>
  static void reverse_vectors(E* d, const E* s, int64_t n) {
    reverse(d, s, n);
  }

  template <typename E>
  static void transpose(E* d, int64_t dh, const E* s, int64_t sh, bool flip) {
    for (int64_t j = 0; j < block<E>; ++j)
      for (int64_t c = 0; c < block<E>; ++c) d[(flip ? block<E> - 1 - c : c) * dh + j] = s[j * sh + c];
  }
};

#ifdef HMTL_X86
#define HMTL_AVX2 __attribute__((target("avx2"), always_inline)) inline

// ---------------------------------------------------------------------------- SSE2 transposes
// SSE2 is part of x86-64: the AVX2 code uses these for 1- and 2-byte elements.

template <int W>
static inline __m128i unpack_lo(__m128i a, __m128i b) {
  if constexpr (W == 1) return _mm_unpacklo_epi8(a, b);
  else if constexpr (W == 2) return _mm_unpacklo_epi16(a, b);
  else if constexpr (W == 4) return _mm_unpacklo_epi32(a, b);
  else return _mm_unpacklo_epi64(a, b);
}

template <int W>
static inline __m128i unpack_hi(__m128i a, __m128i b) {
  if constexpr (W == 1) return _mm_unpackhi_epi8(a, b);
  else if constexpr (W == 2) return _mm_unpackhi_epi16(a, b);
  else if constexpr (W == 4) return _mm_unpackhi_epi32(a, b);
  else return _mm_unpackhi_epi64(a, b);
}

// Rounds of interleaving the n row registers pairwise, W bytes at a time, then 2W, ... up to 8:
// in round W, each group of 16 / W registers pairs its rows 2q and 2q + 1 into registers q (their
// low halves) and q + 8 / W (their high halves).
template <int W>
static inline void interleave_rounds(__m128i* r, int n) {
  if constexpr (W < 16) {
    constexpr int M = 16 / W;
    __m128i u[16];
    for (int h = 0; h < n / M; ++h)
      for (int q = 0; q < M / 2; ++q) {
        u[M * h + q] = unpack_lo<W>(r[M * h + 2 * q], r[M * h + 2 * q + 1]);
        u[M * h + q + M / 2] = unpack_hi<W>(r[M * h + 2 * q], r[M * h + 2 * q + 1]);
      }
    for (int q = 0; q < n; ++q) r[q] = u[q];
    interleave_rounds<2 * W>(r, n);
  }
}

// N x N elements of E (N = 16 / sizeof(E): 16 x 16 bytes, 8 x 8 two-byte elements), one row per
// register: after the rounds, register c holds column c, written as row c of d.
template <typename E>
static inline void transpose_sse2(E* d, int64_t dh, const E* s, int64_t sh, bool flip) {
  constexpr int N = 16 / sizeof(E);
  __m128i r[N];
  for (int q = 0; q < N; ++q) r[q] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + q * sh));
  interleave_rounds<sizeof(E)>(r, N);
  for (int c = 0; c < N; ++c) _mm_storeu_si128(reinterpret_cast<__m128i*>(d + (flip ? N - 1 - c : c) * dh), r[c]);
}

// ---------------------------------------------------------------------------- AVX2

struct Avx2 {
  static constexpr int64_t kBytes = 32;  // one vector

  template <typename E>
  static constexpr int64_t block = sizeof(E) == 1 ? 16 : 8;

  template <typename E>
  HMTL_AVX2 static void copy(E* __restrict__ d, const E* __restrict__ s, int64_t n) {
    const int64_t bytes = n * static_cast<int64_t>(sizeof(E));
    auto* db = reinterpret_cast<char*>(d);
    auto* sb = reinterpret_cast<const char*>(s);
    if (bytes < kBytes) return copy_short(db, sb, bytes);
    switch (vectors_for(bytes)) {  // rows of up to 4 vectors: a 224 px row of bytes cut in 2 or 3
      case 1: return copy_vectors<1>(d, s, n);
      case 2: return copy_vectors<2>(d, s, n);
      case 3: return copy_vectors<3>(d, s, n);
      case 4: return copy_vectors<4>(d, s, n);
    }
    int64_t b = 0;
    for (; b + kBytes <= bytes; b += kBytes)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(db + b), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + b)));
    if (b < bytes)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(db + bytes - kBytes),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + bytes - kBytes)));
  }

  // Fewer than 32 bytes: two moves of the largest power of two that fits, the second ending at
  // the last byte (memcpy would be a library call here).
  HMTL_AVX2 static void copy_short(char* d, const char* s, int64_t bytes) {
    const auto two = [&](auto word) {
      using W = decltype(word);
      W a, b;
      __builtin_memcpy(&a, s, sizeof(W));
      __builtin_memcpy(&b, s + bytes - sizeof(W), sizeof(W));
      __builtin_memcpy(d, &a, sizeof(W));
      __builtin_memcpy(d + bytes - sizeof(W), &b, sizeof(W));
    };
    if (bytes >= 16) two(__m128i{});
    else if (bytes >= 8) two(uint64_t{});
    else if (bytes >= 4) two(uint32_t{});
    else if (bytes >= 2) two(uint16_t{});
    else if (bytes == 1) *d = *s;
  }

  // The vector of 32 bytes at p, its elements of size E in reverse order.
  template <typename E>
  HMTL_AVX2 static __m256i reversed(const E* p) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if constexpr (sizeof(E) == 4) return _mm256_permutevar8x32_epi32(v, _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0));
    const __m256i within = sizeof(E) == 1
        ? _mm256_setr_epi8(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5,
                           4, 3, 2, 1, 0)
        : _mm256_setr_epi8(14, 15, 12, 13, 10, 11, 8, 9, 6, 7, 4, 5, 2, 3, 0, 1, 14, 15, 12, 13, 10, 11, 8, 9, 6, 7, 4,
                           5, 2, 3, 0, 1);
    return _mm256_permute4x64_epi64(_mm256_shuffle_epi8(v, within), 0x4e);  // reverse each half, swap halves
  }

  template <typename E>
  HMTL_AVX2 static void reverse(E* __restrict__ d, const E* __restrict__ s, int64_t n) {
    constexpr int64_t lanes = kBytes / sizeof(E);
    if (n < lanes) return Portable::reverse(d, s, n);
    int64_t j = 0;
    for (; j + lanes <= n; j += lanes)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + j), reversed(s - j - lanes + 1));
    if (j < n) _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + n - lanes), reversed(s - n + 1));
  }

  // Rows of 32 to 128 bytes (uint8 tiles of 32-128 pixels: 74 and 112 at 224 px).
  static constexpr int vectors_for(int64_t bytes) {
    return bytes >= kBytes && bytes <= 4 * kBytes ? static_cast<int>((bytes + kBytes - 1) / kBytes) : 0;
  }

  // n elements making V vectors (vectors_for(n * sizeof(E)) == V): V loads, then V stores, the last
  // vector ending at element n.
  template <int V, typename E>
  HMTL_AVX2 static void copy_vectors(E* __restrict__ d, const E* __restrict__ s, int64_t n) {
    const int64_t last = n * static_cast<int64_t>(sizeof(E)) - kBytes;
    auto* db = reinterpret_cast<char*>(d);
    auto* sb = reinterpret_cast<const char*>(s);
    __m256i v[V];
    for (int q = 0; q < V; ++q)
      v[q] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + (q == V - 1 ? last : q * kBytes)));
    for (int q = 0; q < V; ++q)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(db + (q == V - 1 ? last : q * kBytes)), v[q]);
  }

  template <int V, typename E>
  HMTL_AVX2 static void reverse_vectors(E* __restrict__ d, const E* __restrict__ s, int64_t n) {
    constexpr int64_t lanes = kBytes / sizeof(E);
    __m256i v[V];
    for (int q = 0; q < V; ++q) v[q] = reversed(q == V - 1 ? s - n + 1 : s - q * lanes - lanes + 1);
    for (int q = 0; q < V; ++q)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q == V - 1 ? d + n - lanes : d + q * lanes), v[q]);
  }

  template <typename E>
  HMTL_AVX2 static void transpose(E* d, int64_t dh, const E* s, int64_t sh, bool flip) {
    if constexpr (sizeof(E) < 4) {
      transpose_sse2(d, dh, s, sh, flip);
    } else {  // 8 x 8 four-byte elements in ymm registers
      __m256 r[8], u[8];
      for (int q = 0; q < 8; ++q) r[q] = _mm256_loadu_ps(reinterpret_cast<const float*>(s + q * sh));
      for (int q = 0; q < 8; q += 2) {
        u[q] = _mm256_unpacklo_ps(r[q], r[q + 1]);
        u[q + 1] = _mm256_unpackhi_ps(r[q], r[q + 1]);
      }
      for (int q = 0; q < 8; q += 4)
        for (int h = 0; h < 2; ++h) {
          r[q + 2 * h] = _mm256_shuffle_ps(u[q + h], u[q + h + 2], _MM_SHUFFLE(1, 0, 1, 0));
          r[q + 2 * h + 1] = _mm256_shuffle_ps(u[q + h], u[q + h + 2], _MM_SHUFFLE(3, 2, 3, 2));
        }
      for (int c = 0; c < 4; ++c) {
        u[c] = _mm256_permute2f128_ps(r[c], r[c + 4], 0x20);
        u[c + 4] = _mm256_permute2f128_ps(r[c], r[c + 4], 0x31);
      }
      for (int c = 0; c < 8; ++c) _mm256_storeu_ps(reinterpret_cast<float*>(d + (flip ? 7 - c : c) * dh), u[c]);
    }
  }
};

// Whether this CPU runs AVX2 (checked once).
inline bool cpu_has_avx2() {
  static const bool yes = [] {
    __builtin_cpu_init();  // this may run among the module's constructors, before libgcc's own
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return yes;
}

#undef HMTL_AVX2
#endif  // HMTL_X86

}  // namespace hmtl
