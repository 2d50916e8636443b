// The row passes of the sparse logistic-regression kernel (csrc/cpu/kernels/sparse.cpp, whose
// file comment explains the design): one block of rows, binary or multinomial, reading W and
// accumulating its grad_W through a Table. Included by that file only, in its per-ISA namespace.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "loss_terms.h"

#ifndef CPU_CAPABILITY
#error "csrc/cpu/kernels/sparse_rows.h is for the per-ISA kernel files (-DCPU_CAPABILITY=...)"
#endif

namespace manual_layers {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

constexpr int64_t kBinaryTile = 16;                  // rows per vectorised binary loss step
constexpr int64_t kMultiPrefetch = 16;  // entries ahead whose table row the multinomial pass fetches
// Multinomial tables up to this size stay in a core's L2 (512 KiB on the EPYC, more on newer
// CPUs) once warm: no prefetches there (instructions that cost a tenth of a pass).
constexpr int64_t kPrefetchFromBytes = int64_t(512) << 10;

template <typename acc_t, typename index_t>
struct Problem {
  const int64_t* crow;  // (N + 1,)
  const index_t* col;   // (nnz,)
  const acc_t* val;     // (nnz,)
  int64_t N, D, C, Cp;
  const acc_t* bias;  // (Cp,) zero-padded, or null
  const acc_t* y;     // binary targets (N,), or null
  const int64_t* t;   // multinomial targets (N,), or null
  const acc_t* sw;    // sample weights (N,), or null
  bool prefetch;      // multinomial: whether the table is large enough to prefetch its rows
};

// What a block reads and writes per column j: W's row at w + j * ws, the block's grad_W row at
// g + j * ws. Multinomial with the gradient: the block's interleaved table (g = w + Cp,
// ws = 2 Cp); without it: w is the shared W^T (ws = Cp) and g is null. Binary: w is W itself,
// shared by the blocks, and g the block's own gradient array (ws = 1), or null.
template <typename acc_t>
struct Table {
  const acc_t* w;
  acc_t* g;
  int64_t ws;
};

// Whether the entries e0 .. e1 (one row) all have a column in [0, D). Checked per row before
// the row's gathers and scatters, which then index the table unchecked: min and max of the
// row's indices vectorise, a compare and select per entry in the hot loops did not (a measured
// share of the binary pass: docs/perf-notes-from-code.md). A row that fails is skipped and
// reported after the pass.
template <typename index_t>
inline bool row_in_range(const index_t* col, int64_t e0, int64_t e1, int64_t D) {
  index_t lo = 0, hi = 0;
  for (int64_t e = e0; e < e1; ++e) {
    lo = std::min(lo, col[e]);
    hi = std::max(hi, col[e]);
  }
  return lo >= 0 && (e0 == e1 || static_cast<int64_t>(hi) < D);
}

// The table row of column j (at base + j * ws) as bytes to prefetch, or null when j is not a
// column of the table (the entry ahead may be in a row that fails row_in_range; the address
// must stay valid). The prefetches themselves are issued by the callers: GCC 12 removed every
// prefetch of a helper that did nothing else (checked in the object code).
template <typename acc_t, typename index_t>
inline const char* table_row(const acc_t* base, int64_t ws, index_t j, int64_t D) {
  const uint64_t ju = static_cast<uint64_t>(static_cast<int64_t>(j));
  return ju < static_cast<uint64_t>(D)
             ? reinterpret_cast<const char*>(base + static_cast<int64_t>(ju) * ws)
             : nullptr;
}

template <typename acc_t>
inline acc_t hsum(const Vectorized<acc_t>& v) {
  constexpr int64_t V = Vectorized<acc_t>::size();
  alignas(64) acc_t t[V];
  v.store(t);
  for (int64_t h = V / 2; h >= 1; h /= 2)
    for (int64_t j = 0; j < h; ++j) t[j] += t[j + h];
  return t[0];
}

template <typename acc_t>
inline acc_t hmax(const Vectorized<acc_t>& v) {
  constexpr int64_t V = Vectorized<acc_t>::size();
  alignas(64) acc_t t[V];
  v.store(t);
  acc_t m = t[0];
  for (int64_t j = 1; j < V; ++j) m = std::max(m, t[j]);
  return m;
}

// Binary rows r0 .. r1: z per row (scalar, four chains), the losses and residuals of a tile of
// kBinaryTile rows in vectors (the dense pass's stable forms, csrc/cpu/kernels/losses.cpp
// BceLoss), then the tile's scatter. W is read at T.w and the gradient added at T.g, two
// separate arrays of stride 1 (T.ws == 1), and nothing is prefetched: see the file comment of
// sparse.cpp for why binary differs from multinomial here.
template <bool GRAD, typename acc_t, typename index_t>
void binary_block(const Problem<acc_t, index_t>& p, const Table<acc_t>& T, int64_t r0,
                  int64_t r1, acc_t* gb, double& loss_out, bool& bad_out) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  static_assert(kBinaryTile % V == 0, "whole vectors per tile");
  alignas(64) acc_t z[kBinaryTile], r[kBinaryTile], l[kBinaryTile];
  bool ok[kBinaryTile];
  const acc_t b = p.bias ? p.bias[0] : acc_t(0);
  const acc_t* W = T.w;
  acc_t* g = T.g;
  const acc_t* val = p.val;
  const index_t* col = p.col;
  double loss = 0;
  acc_t gsum = 0;
  bool bad = false;
  for (int64_t i0 = r0; i0 < r1; i0 += kBinaryTile) {
    const int64_t nr = std::min(kBinaryTile, r1 - i0);
    for (int64_t k = 0; k < kBinaryTile; ++k) {
      if (k >= nr) {
        z[k] = acc_t(0);
        ok[k] = false;
        continue;
      }
      const int64_t i = i0 + k;
      int64_t e = p.crow[i];
      const int64_t e1 = p.crow[i + 1];
      ok[k] = row_in_range(col, e, e1, p.D);
      bad |= !ok[k];
      if (!ok[k]) e = e1;
      acc_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
      for (; e + 4 <= e1; e += 4) {
        a0 += val[e] * W[col[e]];
        a1 += val[e + 1] * W[col[e + 1]];
        a2 += val[e + 2] * W[col[e + 2]];
        a3 += val[e + 3] * W[col[e + 3]];
      }
      for (; e < e1; ++e) a0 += val[e] * W[col[e]];
      z[k] = ((a0 + a1) + (a2 + a3)) + b;
    }
    // the dense pass's loss terms and residuals (loss_terms.h, BceLoss, pos_weight 1): the
    // tile's rows i0 .. i0 + nr are contiguous, their targets and weights read there
    BceLoss<acc_t>{p.y, p.sw, acc_t(1)}.tile(i0, nr, kBinaryTile, z, r, l);
    for (int64_t k = 0; k < nr; ++k) {
      loss += static_cast<double>(l[k]);
      gsum += r[k];
    }
    if constexpr (GRAD) {
      for (int64_t k = 0; k < nr; ++k) {
        if (!ok[k]) continue;
        const acc_t rk = r[k];
        const int64_t e1 = p.crow[i0 + k + 1];
        for (int64_t e = p.crow[i0 + k]; e < e1; ++e) g[col[e]] += rk * val[e];
      }
    }
  }
  if (gb != nullptr) gb[0] = gsum;
  loss_out = loss;
  bad_out = bad;
}

// Multinomial rows r0 .. r1, vectorised over the Cp = NV * V (padded) classes; NV == 0: any Cp,
// the row's logits and residual kept in memory instead of registers.
template <int NV, typename acc_t, typename index_t>
void multi_block(const Problem<acc_t, index_t>& p, const Table<acc_t>& T, int64_t r0,
                 int64_t r1, acc_t* gb, double& loss_out, bool& bad_out) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t Cp = p.Cp, C = p.C, ws = T.ws;
  const int64_t nv = NV > 0 ? NV : Cp / V;
  // the table row's bytes: W^T_j, and grad_W^T_j right after it when the gradient is wanted
  const int64_t pf_bytes = (T.g != nullptr ? 2 : 1) * Cp * static_cast<int64_t>(sizeof(acc_t));
  const index_t* col = p.col;
  acc_t* g = T.g;
  const int64_t pf_end =
      p.prefetch ? p.crow[r1] - kMultiPrefetch : std::numeric_limits<int64_t>::min();
  std::vector<acc_t> zb(Cp), rb(Cp), gbb(Cp, acc_t(0));
  double loss = 0;
  bool bad = false;
  for (int64_t i = r0; i < r1; ++i) {
    const int64_t e0 = p.crow[i], e1 = p.crow[i + 1];
    const bool ok = row_in_range(col, e0, e1, p.D);
    bad |= !ok;
    const int64_t ee = ok ? e1 : e0;  // a row with a bad column: no gathers, no scatters
    // 1. logits; the table rows kMultiPrefetch entries ahead are fetched meanwhile
    if constexpr (NV > 0) {
      Vec acc[NV];
      for (int q = 0; q < NV; ++q) acc[q] = p.bias ? Vec::loadu(p.bias + q * V) : Vec(0);
      for (int64_t e = e0; e < ee; ++e) {
        if (e < pf_end) {
          const char* row = table_row(T.w, ws, col[e + kMultiPrefetch], p.D);
          for (int64_t o = 0; row != nullptr && o < pf_bytes; o += 64) {
            if (g != nullptr) __builtin_prefetch(row + o, 1, 3);
            else __builtin_prefetch(row + o, 0, 3);
          }
        }
        const Vec v(p.val[e]);
        const acc_t* w = T.w + col[e] * ws;
        for (int q = 0; q < NV; ++q) acc[q] = at::vec::fmadd(v, Vec::loadu(w + q * V), acc[q]);
      }
      for (int q = 0; q < NV; ++q) acc[q].store(zb.data() + q * V);
    } else {
      for (int64_t c = 0; c < Cp; ++c) zb[c] = p.bias ? p.bias[c] : acc_t(0);
      for (int64_t e = e0; e < ee; ++e) {
        if (e < pf_end) {
          const char* row = table_row(T.w, ws, col[e + kMultiPrefetch], p.D);
          for (int64_t o = 0; row != nullptr && o < pf_bytes; o += 64) {
            if (g != nullptr) __builtin_prefetch(row + o, 1, 3);
            else __builtin_prefetch(row + o, 0, 3);
          }
        }
        const Vec v(p.val[e]);
        const acc_t* w = T.w + col[e] * ws;
        for (int64_t q = 0; q < nv; ++q) {
          acc_t* zq = zb.data() + q * V;
          at::vec::fmadd(v, Vec::loadu(w + q * V), Vec::loadu(zq)).store(zq);
        }
      }
    }
    // 2. softmax over the C real classes (padding lanes -inf: exp gives 0), loss, residual
    for (int64_t c = C; c < Cp; ++c) zb[c] = -std::numeric_limits<acc_t>::infinity();
    Vec mv = Vec::loadu(zb.data());
    for (int64_t q = 1; q < nv; ++q) mv = at::vec::maximum(mv, Vec::loadu(zb.data() + q * V));
    const acc_t m = hmax(mv);
    Vec sv(0);
    for (int64_t q = 0; q < nv; ++q) {
      const Vec ex = (Vec::loadu(zb.data() + q * V) - Vec(m)).exp();
      ex.store(rb.data() + q * V);
      sv = sv + ex;
    }
    const acc_t ssum = hsum(sv);
    const int64_t t = p.t[i];
    const acc_t si = p.sw ? p.sw[i] : acc_t(1);
    loss += static_cast<double>(si * ((m + std::log(ssum)) - zb[t]));
    const Vec scale(si / ssum);
    for (int64_t q = 0; q < nv; ++q) {
      acc_t* rq = rb.data() + q * V;
      (Vec::loadu(rq) * scale).store(rq);
    }
    rb[t] -= si;
    for (int64_t q = 0; q < nv; ++q) {
      acc_t* gq = gbb.data() + q * V;
      (Vec::loadu(gq) + Vec::loadu(rb.data() + q * V)).store(gq);
    }
    // 3. grad_W^T[col_e, :] += v_e r_i
    if (g == nullptr) continue;
    if constexpr (NV > 0) {
      Vec rv[NV];
      for (int q = 0; q < NV; ++q) rv[q] = Vec::loadu(rb.data() + q * V);
      for (int64_t e = e0; e < ee; ++e) {
        const Vec v(p.val[e]);
        acc_t* gj = g + col[e] * ws;
        for (int q = 0; q < NV; ++q)
          at::vec::fmadd(v, rv[q], Vec::loadu(gj + q * V)).store(gj + q * V);
      }
    } else {
      for (int64_t e = e0; e < ee; ++e) {
        const Vec v(p.val[e]);
        acc_t* gj = g + col[e] * ws;
        for (int64_t q = 0; q < nv; ++q)
          at::vec::fmadd(v, Vec::loadu(rb.data() + q * V), Vec::loadu(gj + q * V))
              .store(gj + q * V);
      }
    }
  }
  if (gb != nullptr) std::copy(gbb.begin(), gbb.end(), gb);
  loss_out = loss;
  bad_out = bad;
}

template <typename acc_t, typename index_t>
void run_block(const Problem<acc_t, index_t>& p, const Table<acc_t>& T, int64_t r0, int64_t r1,
               acc_t* gb, double& loss, bool& bad) {
  constexpr int64_t V = Vectorized<acc_t>::size();
  if (p.t == nullptr) {
    if (T.g != nullptr) return binary_block<true>(p, T, r0, r1, gb, loss, bad);
    return binary_block<false>(p, T, r0, r1, gb, loss, bad);
  }
  switch (p.Cp / V) {
    case 1: return multi_block<1>(p, T, r0, r1, gb, loss, bad);
    case 2: return multi_block<2>(p, T, r0, r1, gb, loss, bad);
    case 3: return multi_block<3>(p, T, r0, r1, gb, loss, bad);
    case 4: return multi_block<4>(p, T, r0, r1, gb, loss, bad);
    case 5: return multi_block<5>(p, T, r0, r1, gb, loss, bad);
    case 6: return multi_block<6>(p, T, r0, r1, gb, loss, bad);
    case 8: return multi_block<8>(p, T, r0, r1, gb, loss, bad);
    default: return multi_block<0>(p, T, r0, r1, gb, loss, bad);
  }
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace manual_layers
