// The row pieces of the CPU loss pass (losses.cpp): a vector's lane sum, the logits of a few
// rows (read one after another, with the prefetch), and the register-blocked grad_W sweep
// over a tile. Per-ISA like it.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

#include "loss_tiles.h"  // per-ISA only: its guard covers this header too
#include "vec_io.h"

// Full unrolling of the register blocks' loops over classes and vectors (compile-time bounds):
// without it GCC kept the accumulator arrays in memory (a zeroing `rep stos` per row in
// row_logits, a store of every accumulator per row in sweep_block), which halved the cross
// entropy pass's FMA rate on the 2-core AVX2 EPYC (docs/perf-notes-from-code.md).
#if defined(__clang__)
#define ML_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define ML_UNROLL _Pragma("GCC unroll 16")
#else
#define ML_UNROLL
#endif

namespace manual_layers {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// The sum of a vector's lanes. at::vec's vec_reduce_all has a shuffle tree for float but, on
// AVX-512, a lane-by-lane generic loop for double that made the float64 logits several times
// slower than their FMAs (docs/perf-notes-from-code.md); here: halves added pairwise.
template <typename acc_t>
inline acc_t hsum(const Vectorized<acc_t>& v) {
  using Vec = Vectorized<acc_t>;
  if constexpr (std::is_same_v<acc_t, float>) {
    return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    // the same order in registers: x_j + x_{j+4}, + the pair two apart, + the neighbour (the
    // store and seven dependent scalar adds were most of a narrow float64 row's logits on Zen 4)
    const __m256d s = _mm256_add_pd(_mm512_castpd512_pd256(v), _mm512_extractf64x4_pd(v, 1));
    const __m128d u = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
    return _mm_cvtsd_f64(_mm_add_sd(u, _mm_unpackhi_pd(u, u)));
#elif defined(CPU_CAPABILITY_AVX2)
    const __m128d u = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(u, _mm_unpackhi_pd(u, u)));
#endif
    constexpr int64_t V = Vec::size();
    alignas(64) acc_t t[V];
    v.store(t);
    for (int64_t h = V / 2; h >= 1; h /= 2)
      for (int64_t j = 0; j < h; ++j) t[j] += t[j + h];
    return t[0];
  }
}

// hsum of four vectors, z[k * zs] = hsum(v[k]) bitwise (the same halves-pairwise order), with
// the four reductions sharing their shuffles (AVX2 float and double, AVX-512 double; the rest
// loop over hsum): on the 2-core AVX2 EPYC one hsum per row (a
// store and three dependent scalar adds for float64) was a large share of a narrow row's
// logits (float64 40,000 x 30 binary: docs/perf-notes-from-code.md, "narrow rows").
template <typename acc_t>
inline void hsum4(const Vectorized<acc_t>& v0, const Vectorized<acc_t>& v1,
                  const Vectorized<acc_t>& v2, const Vectorized<acc_t>& v3, acc_t* z,
                  int64_t zs) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, double>) {
    // per row [x0 x1 x2 x3] -> [x0+x2, x1+x3] (halves), two rows per vector, then the pairs
    // added: (x0+x2)+(x1+x3), as hsum
    const __m256d a = _mm256_add_pd(_mm256_permute2f128_pd(v0, v1, 0x20),
                                    _mm256_permute2f128_pd(v0, v1, 0x31));
    const __m256d b = _mm256_add_pd(_mm256_permute2f128_pd(v2, v3, 0x20),
                                    _mm256_permute2f128_pd(v2, v3, 0x31));
    alignas(32) double t[4];  // rows 0, 2, 1, 3
    _mm256_store_pd(t, _mm256_hadd_pd(a, b));
    z[0] = t[0], z[zs] = t[2], z[2 * zs] = t[1], z[3 * zs] = t[3];
    return;
  }
  if constexpr (std::is_same_v<acc_t, float>) {
    // per row: x_j + x_{j+4}, two rows per vector (one per 128-bit lane), then as
    // vec_reduce_all: + the 64-bit swap, + the 32-bit swap; lane 0 of each 128-bit half
    const auto halves = [](const __m256 p, const __m256 q) {
      __m256 h = _mm256_add_ps(_mm256_permute2f128_ps(p, q, 0x20),
                               _mm256_permute2f128_ps(p, q, 0x31));
      h = _mm256_add_ps(h, _mm256_shuffle_ps(h, h, 0x4E));
      return _mm256_add_ps(h, _mm256_shuffle_ps(h, h, 0xB1));
    };
    alignas(32) float t[16];
    _mm256_store_ps(t, halves(v0, v1));
    _mm256_store_ps(t + 8, halves(v2, v3));
    z[0] = t[0], z[zs] = t[4], z[2 * zs] = t[8], z[3 * zs] = t[12];
    return;
  }
#endif
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, double>) {
    // hsum's steps on four rows at once: per row x_j + x_{j+4} (two rows per vector), + the pair
    // two apart (four rows per vector), + the neighbour; row k's sum in lane 2k
    const __m512d p01 = _mm512_add_pd(_mm512_shuffle_f64x2(v0, v1, 0x44),
                                      _mm512_shuffle_f64x2(v0, v1, 0xEE));
    const __m512d p23 = _mm512_add_pd(_mm512_shuffle_f64x2(v2, v3, 0x44),
                                      _mm512_shuffle_f64x2(v2, v3, 0xEE));
    const __m512d q = _mm512_add_pd(_mm512_shuffle_f64x2(p01, p23, 0x88),
                                    _mm512_shuffle_f64x2(p01, p23, 0xDD));
    alignas(64) double t[8];
    _mm512_store_pd(t, _mm512_add_pd(q, _mm512_permute_pd(q, 0x55)));
    z[0] = t[0], z[zs] = t[2], z[2 * zs] = t[4], z[3 * zs] = t[6];
    return;
  }
#endif
  z[0] = hsum(v0), z[zs] = hsum(v1), z[2 * zs] = hsum(v2), z[3 * zs] = hsum(v3);
}

// z[c * kRows] = W_c . x + b_c for NC classes c0 .. c0 + NC of ONE row x (D values, read in
// place: a last partial vector is a masked load, never past the row): NC x ND accumulators,
// each x vector loaded once serves NC FMAs, ND independent chains per class keep the FMA
// pipe busy when NC is small. W rows are zero-padded to Dp.
template <int NC, int ND, typename acc_t>
inline void row_logits(const acc_t* x, const acc_t* W, const acc_t* bias, int64_t c0, int64_t D,
                       int64_t Dp, acc_t* z) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  Vec acc[NC][ND];
  ML_UNROLL
  for (int i = 0; i < NC; ++i)
    ML_UNROLL
    for (int j = 0; j < ND; ++j) acc[i][j] = Vec(0);
  const acc_t* w = W + c0 * Dp;
  int64_t d = 0;
  for (; d + ND * V <= D; d += ND * V) {
    ML_UNROLL
    for (int j = 0; j < ND; ++j) {
      const Vec xv = Vec::loadu(x + d + j * V);
      ML_UNROLL
      for (int i = 0; i < NC; ++i)
        acc[i][j] = at::vec::fmadd(xv, Vec::loadu(w + i * Dp + d + j * V), acc[i][j]);
    }
  }
  // at most ND vectors left (whole, then a partial one), one per accumulator chain (one chain
  // took them all before: a serial chain of FMAs at the end of every narrow row)
  // (written out with constant accumulator indices: a loop over them kept acc in memory)
#define ML_ROW_LOGITS_TAIL(J)                                                  \
  if (d < D) {                                                                 \
    const Vec xv = D - d >= V ? Vec::loadu(x + d) : Vec::loadu(x + d, D - d); \
    ML_UNROLL                                                                  \
    for (int i = 0; i < NC; ++i)                                               \
      acc[i][J] = at::vec::fmadd(xv, Vec::loadu(w + i * Dp + d), acc[i][J]);   \
    d += V;                                                                    \
  }
  static_assert(ND == 1 || ND == 2 || ND == 4, "row_logits: 1, 2 or 4 vectors per class");
  ML_ROW_LOGITS_TAIL(0)
  if constexpr (ND >= 2) {
    ML_ROW_LOGITS_TAIL(1)
  }
  if constexpr (ND == 4) {
    ML_ROW_LOGITS_TAIL(2)
    ML_ROW_LOGITS_TAIL(3)
  }
#undef ML_ROW_LOGITS_TAIL
  ML_UNROLL
  for (int i = 0; i < NC; ++i) {
    Vec a = acc[i][0];
    ML_UNROLL
    for (int j = 1; j < ND; ++j) a = a + acc[i][j];
    z[i * kRows] = hsum(a) + (bias ? bias[c0 + i] : acc_t(0));
  }
}

// z[i * kRows + k] = W_{c0+i} . x_k + b_{c0+i} for two rows x_0, x_1 (k = 0, 1) and four
// classes: 2 x 4 accumulators, each W vector loaded once for both rows (6 loads per 8 FMAs,
// against 5 per 4 for one row), the rows' last partial vector a masked load.
template <typename acc_t>
inline void two_rows_logits4(const acc_t* x0, const acc_t* x1, const acc_t* W, const acc_t* bias,
                             int64_t c0, int64_t D, int64_t Dp, acc_t* z) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const acc_t* w = W + c0 * Dp;
  Vec a00(0), a01(0), a02(0), a03(0), a10(0), a11(0), a12(0), a13(0);
  for (int64_t d = 0; d < D; d += V) {
    const int64_t n = std::min<int64_t>(V, D - d);
    const Vec u = n == V ? Vec::loadu(x0 + d) : Vec::loadu(x0 + d, n);
    const Vec v = n == V ? Vec::loadu(x1 + d) : Vec::loadu(x1 + d, n);
    Vec wv = Vec::loadu(w + d);
    a00 = at::vec::fmadd(u, wv, a00), a10 = at::vec::fmadd(v, wv, a10);
    wv = Vec::loadu(w + Dp + d);
    a01 = at::vec::fmadd(u, wv, a01), a11 = at::vec::fmadd(v, wv, a11);
    wv = Vec::loadu(w + 2 * Dp + d);
    a02 = at::vec::fmadd(u, wv, a02), a12 = at::vec::fmadd(v, wv, a12);
    wv = Vec::loadu(w + 3 * Dp + d);
    a03 = at::vec::fmadd(u, wv, a03), a13 = at::vec::fmadd(v, wv, a13);
  }
  hsum4(a00, a01, a02, a03, z, kRows);
  hsum4(a10, a11, a12, a13, z + 1, kRows);
  for (int i = 0; i < 4; ++i) {
    const acc_t b = bias ? bias[c0 + i] : acc_t(0);
    z[i * kRows] += b, z[i * kRows + 1] += b;
  }
}

// z[c * kRows + k] = W_c . x_k + b_c for the kTile rows x_k = x + k * xs (k < kTile). One class
// (the binary pass's C = 1 outside its own direct path) or a few: the rows are read ONE AFTER
// ANOTHER, each front to back: interleaving the loads of 4 rows (to reuse each W vector for 4
// rows) kept the memory reads of the binary pass at about half of X.sum()'s rate on Zen 4; one
// row at a time they stream like X.sum() (docs/perf-notes-from-code.md). Four classes and more
// (compute-bound): two rows at a time in blocks of four classes (two_rows_logits4), which read
// each W vector once per two rows: the loads, not the FMAs, had set the pace.
template <typename acc_t>
inline void logits_block(const acc_t* x, int64_t xs, const acc_t* W, const acc_t* bias, int64_t C,
                         int64_t D, int64_t Dp, acc_t* z) {
  static_assert(kTile % 2 == 0, "pairs of rows");
  const int64_t c4 = C / 4 * 4;
  if (c4 > 0) {
    for (int64_t k = 0; k < kTile; k += 2)
      for (int64_t c = 0; c < c4; c += 4)
        two_rows_logits4(x + k * xs, x + (k + 1) * xs, W, bias, c, D, Dp, z + c * kRows + k);
  }
  for (int64_t k = 0; k < kTile; ++k, x += xs, ++z) {
    switch (C - c4) {
      case 3: row_logits<3, 2>(x, W, bias, c4, D, Dp, z + c4 * kRows); break;
      case 2: row_logits<2, 2>(x, W, bias, c4, D, Dp, z + c4 * kRows); break;
      case 1: row_logits<1, 4>(x, W, bias, c4, D, Dp, z + c4 * kRows); break;
      default: break;
    }
  }
}

// The same for one class (binary), rows read in place in x's own dtype (src_t: acc_t, or
// bf16/fp16 converted as loaded, so 16-bit rows are neither copied nor widened in memory); with
// PF, the row pf_stride bytes ahead of each row is prefetched into L2 a line at a time as the
// row is read (see run_block). The four accumulators are named variables: as an array inlined
// into run_block, GCC 12 kept them on the stack (a store and a reload per FMA).
template <bool PF, typename acc_t, typename src_t>
inline void logits_block_binary(const src_t* x, int64_t xs, const acc_t* W, const acc_t* bias,
                                int64_t D, acc_t* z, const char* pf, int64_t pf_stride) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  constexpr int64_t S = sizeof(src_t);
  const acc_t b = bias ? bias[0] : acc_t(0);
  static_assert(kTile == 4, "hsum4 reduces the tile's rows");
  Vec row[kTile];
  ML_UNROLL
  for (int64_t k = 0; k < kTile; ++k, x += xs, pf += pf_stride) {
    Vec a0(0), a1(0), a2(0), a3(0);
    int64_t d = 0;
    for (; d + 4 * V <= D; d += 4 * V) {
      if constexpr (PF) {
        for (int64_t o = 0; o < 4 * V * S; o += 64) __builtin_prefetch(pf + d * S + o, 0, 2);
      }
      a0 = at::vec::fmadd(load<src_t, acc_t>(x + d, V), Vec::loadu(W + d), a0);
      a1 = at::vec::fmadd(load<src_t, acc_t>(x + d + V, V), Vec::loadu(W + d + V), a1);
      a2 = at::vec::fmadd(load<src_t, acc_t>(x + d + 2 * V, V), Vec::loadu(W + d + 2 * V), a2);
      a3 = at::vec::fmadd(load<src_t, acc_t>(x + d + 3 * V, V), Vec::loadu(W + d + 3 * V), a3);
    }
    if constexpr (PF) {
      // The lines of the rest of the row, its last byte included (rows need not start a line).
      for (int64_t o = d * S; o < D * S; o += 64) __builtin_prefetch(pf + o, 0, 2);
      __builtin_prefetch(pf + D * S - 1, 0, 2);
    }
    // as row_logits<1, 4>: the (at most four) vectors left, whole then a partial one, one into
    // each accumulator
    const auto tail = [&](Vec& a) {
      if (d < D) {
        a = at::vec::fmadd(load<src_t, acc_t>(x + d, std::min<int64_t>(V, D - d)),
                           Vec::loadu(W + d), a);
        d += V;
      }
    };
    tail(a0), tail(a1), tail(a2), tail(a3);
    row[k] = ((a0 + a1) + a2) + a3;  // row_logits<1, 4>'s order: bitwise the same
  }
  hsum4(row[0], row[1], row[2], row[3], z, 1);
  for (int64_t k = 0; k < kTile; ++k) z[k] += b;
}

// g[i * Dp + j * V ..] += sum_{k < kr} r[i * kRows + k] x_k[j * V ..] for NC classes and ND
// feature vectors: NC x ND accumulators held in registers over the tile's rows. len < V: the
// last of the ND vectors is the rows' partial one (masked loads; g's padding gets zeros added).
template <int NC, int ND, typename acc_t, typename src_t>
inline void sweep_block(const acc_t* r, const src_t* x, int64_t xs, int64_t kr, acc_t* g,
                        int64_t Dp, int64_t len = Vectorized<acc_t>::size()) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  Vec acc[NC][ND];
  ML_UNROLL
  for (int i = 0; i < NC; ++i)
    ML_UNROLL
    for (int j = 0; j < ND; ++j) acc[i][j] = Vec::loadu(g + i * Dp + j * V);
  for (int64_t k = 0; k < kr; ++k, x += xs) {
    Vec xv[ND];
    ML_UNROLL
    for (int j = 0; j < ND; ++j) xv[j] = load<src_t, acc_t>(x + j * V, j == ND - 1 ? len : V);
    ML_UNROLL
    for (int i = 0; i < NC; ++i) {
      const Vec rv(r[i * kRows + k]);
      ML_UNROLL
      for (int j = 0; j < ND; ++j) acc[i][j] = at::vec::fmadd(rv, xv[j], acc[i][j]);
    }
  }
  ML_UNROLL
  for (int i = 0; i < NC; ++i)
    ML_UNROLL
    for (int j = 0; j < ND; ++j) acc[i][j].store(g + i * Dp + j * V);
}

// sweep_block for the classes c, c + 1 (two) or c alone, ND feature vectors.
template <int ND, typename acc_t, typename src_t>
inline void sweep_classes(bool two, const acc_t* r, const src_t* x, int64_t xs, int64_t kr,
                          acc_t* g, int64_t Dp, int64_t len = Vectorized<acc_t>::size()) {
  if (two) sweep_block<2, ND>(r, x, xs, kr, g, Dp, len);
  else sweep_block<1, ND>(r, x, xs, kr, g, Dp, len);
}

// grad_W (C x Dp) += R^T X for the tile: R class-major (C x kRows), rows x_k = x + k * xs of D
// values each (acc_t, or 16-bit rows read in place by the binary pass).
template <typename acc_t, typename src_t>
inline void sweep_tile(const acc_t* r, const src_t* x, int64_t xs, int64_t kr, acc_t* gw,
                       int64_t C, int64_t D, int64_t Dp) {
  constexpr int64_t V = Vectorized<acc_t>::size();
  for (int64_t c = 0; c < C; c += 2) {
    const acc_t* rc = r + c * kRows;
    acc_t* g = gw + c * Dp;
    const bool two = c + 2 <= C;
    int64_t d = 0;
    for (; d + 4 * V <= D; d += 4 * V) sweep_classes<4>(two, rc, x + d, xs, kr, g + d, Dp);
    // The (at most four) vectors left in one sweep, the last one partial or whole: one sweep
    // per vector was a serial chain of kr FMAs each, a large share of a narrow row's pass.
    const int64_t nv = (D - d + V - 1) / V;
    const int64_t len = D - (d + (nv - 1) * V);
    switch (nv) {
      case 4: sweep_classes<4>(two, rc, x + d, xs, kr, g + d, Dp, len); break;
      case 3: sweep_classes<3>(two, rc, x + d, xs, kr, g + d, Dp, len); break;
      case 2: sweep_classes<2>(two, rc, x + d, xs, kr, g + d, Dp, len); break;
      case 1: sweep_classes<1>(two, rc, x + d, xs, kr, g + d, Dp, len); break;
      default: break;
    }
  }
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace manual_layers
