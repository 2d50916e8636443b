// The per-tile loss terms and residuals of the CPU loss pass (losses.cpp): binary (BceLoss) and
// multinomial (CeLoss) cross entropy, vectorised over a tile's rows. Per-ISA like it.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "loss_tiles.h"
#include "vec_io.h"

namespace manual_layers {
namespace CPU_CAPABILITY {
namespace {

// ---------------------------------------------------------------------------------------------
// Per-tile losses, vectorised over the tile's ROWS (one lane per row): the transcendental
// functions run once per kRows / Vec::size() rows and class, not once per row.
// tile(i0, nr, z, r, loss) takes the logits of rows i0 .. i0 + nr CLASS-MAJOR (z[c * kRows + k]
// is row i0 + k, class c), writes the residuals dloss/dz in the same layout into r and the rows'
// losses into loss[0 .. kRows). Lanes nr .. kRows hold finite padding; the caller discards them.

// log1p(e) for e in [0, 1]: 2 atanh(s) with s = e / (2 + e) in [0, 1/3], the odd series
// 2 s (1 + s^2/3 + s^4/5 + ...) cut where its next term is below 2e-17 (float64; 2e-8 for float)
// of the sum, evaluated as two Horner chains in s^4. Accurate to about 2 ulp, e itself (not 0)
// where 1 + e rounds to 1. It replaced log(1 + e) e / e' (Sleef's vector log1p costs ~350
// cycles per 512-bit vector on Zen 4): Sleef's AVX2 log was a third of the float64 binary
// pass's time on narrow rows on the 2-core AVX2 EPYC (docs/perf-notes-from-code.md).
template <typename acc_t>
inline Vectorized<acc_t> log1p_unit(const Vectorized<acc_t>& e) {
  using Vec = Vectorized<acc_t>;
  // 1 / (2k + 1) for k = 0 .. 15 (float64) or 0 .. 7 (float), even k then odd k
  constexpr int kTerms = std::is_same_v<acc_t, double> ? 16 : 8;
  const Vec s = e / (Vec(2) + e);
  const Vec t = s * s, u = t * t;
  Vec even(acc_t(1) / acc_t(2 * (kTerms - 2) + 1)), odd(acc_t(1) / acc_t(2 * (kTerms - 1) + 1));
  for (int k = kTerms - 4; k >= 0; k -= 2) {
    even = at::vec::fmadd(even, u, Vec(acc_t(1) / acc_t(2 * k + 1)));
    odd = at::vec::fmadd(odd, u, Vec(acc_t(1) / acc_t(2 * k + 3)));
  }
  return Vec(2) * s * at::vec::fmadd(odd, t, even);
}

// loss = sw * [(1 - y) z + (1 + (pw - 1) y) softplus(-z)],
// dloss/dz = sw * [(1 - y) - (1 + (pw - 1) y) sigmoid(-z)]   (= sw (sigmoid(z) - y) for pw = 1),
// with softplus(-z) = max(-z, 0) + log1p(exp(-|z|)): no overflow for any z.
template <typename acc_t>
struct BceLoss {
  const acc_t* target;  // (N,)
  const acc_t* sample_weight;  // (N,) or null
  acc_t pos_weight;  // 1 when None

  inline void tile(int64_t i0, int64_t nr, int64_t rows, const acc_t* z, acc_t* r,
                   acc_t* loss) const {
    using Vec = Vectorized<acc_t>;
    constexpr int64_t V = Vec::size();
    const Vec one(1), zero(0);
    for (int64_t k = 0; k < rows; k += V) {
      const int64_t len = std::max<int64_t>(0, std::min<int64_t>(V, nr - k));
      const Vec zv = Vec::loadu(z + k);
      const Vec y = Vec::loadu(target + i0 + k, len);
      const Vec e = zv.abs().neg().exp();  // exp(-|z|) in (0, 1]
      const Vec w = one + e;
      const Vec softplus_neg = at::vec::maximum(zv.neg(), zero) + log1p_unit(e);
      const Vec inv = one / w;
      const Vec sigmoid_neg = Vec::blendv(inv, e * inv, zv >= zero);
      const Vec lw = one + (Vec(pos_weight) - one) * y;
      const Vec sw = sample_weight ? Vec::loadu(sample_weight + i0 + k, len) : one;
      (sw * ((one - y) - lw * sigmoid_neg)).store(r + k);
      (sw * ((one - y) * zv + lw * softplus_neg)).store(loss + k);
    }
  }
};

// With eps = label_smoothing, w = class weights (ones if None), t = target, p = softmax(z):
//   loss = (1 - eps) w_t (lse - z_t) + (eps / C) sum_c w_c (lse - z_c)
//   dloss/dz_c = [(1 - eps) w_t + (eps / C) sum_k w_k] p_c - (1 - eps) w_t [c == t] - (eps / C) w_c
// Ignored rows have zero loss and residual. Targets were range-checked before the pass.
// Per lane (row): m = max_c z_c, s = sum_c exp(z_c - m) in class order, lse = m + log s.
template <typename acc_t>
struct CeLoss {
  const int64_t* target;  // (N,)
  const acc_t* class_weight;  // (C,) or null
  int64_t C;
  int64_t ignore_index;
  acc_t eps;
  acc_t class_weight_sum;  // sum_k w_k (C when None)

  inline void tile(int64_t i0, int64_t nr, int64_t rows, const acc_t* z, acc_t* r,
                   acc_t* loss) const {
    using Vec = Vectorized<acc_t>;
    constexpr int64_t V = Vec::size();
    const acc_t keep = acc_t(1) - eps, eps_c = eps / acc_t(C);
    // Per row: the target's logit and weight; ignored and padding rows get weight 0 and are
    // zeroed after the vector pass (whatever their logits, as torch gives them no gradient).
    int64_t tk[kRows];
    acc_t zt[kRows], wt[kRows];
    for (int64_t k = 0; k < kRows; ++k) {
      const int64_t t = k < nr ? target[i0 + k] : ignore_index;
      const bool valid = k < nr && t != ignore_index;
      tk[k] = valid ? t : -1;
      zt[k] = valid ? z[t * kRows + k] : acc_t(0);
      wt[k] = valid ? (class_weight ? class_weight[t] : acc_t(1)) : acc_t(0);
    }
    for (int64_t k = 0; k < rows; k += V) {
      Vec m = Vec::loadu(z + k);
      for (int64_t c = 1; c < C; ++c) m = at::vec::maximum(m, Vec::loadu(z + c * kRows + k));
      Vec s(0);
      for (int64_t c = 0; c < C; ++c) {
        const Vec e = (Vec::loadu(z + c * kRows + k) - m).exp();
        e.store(r + c * kRows + k);
        s = s + e;
      }
      const Vec lse = m + s.log();
      const Vec w = Vec::loadu(wt + k);
      Vec l = Vec(keep) * w * (lse - Vec::loadu(zt + k));
      const Vec a = Vec(keep) * w + Vec(eps_c * class_weight_sum);
      const Vec inv_s = Vec(1) / s;
      if (eps != acc_t(0)) {
        Vec smooth(0);
        for (int64_t c = 0; c < C; ++c) {
          const Vec wc(class_weight ? class_weight[c] : acc_t(1));
          smooth = smooth + wc * (lse - Vec::loadu(z + c * kRows + k));
          acc_t* rc = r + c * kRows + k;
          (a * (Vec::loadu(rc) * inv_s) - Vec(eps_c) * wc).store(rc);
        }
        l = l + Vec(eps_c) * smooth;
      } else {
        for (int64_t c = 0; c < C; ++c) {
          acc_t* rc = r + c * kRows + k;
          (a * (Vec::loadu(rc) * inv_s)).store(rc);
        }
      }
      l.store(loss + k);
    }
    for (int64_t k = 0; k < rows; ++k) {
      if (tk[k] >= 0) {
        r[tk[k] * kRows + k] -= keep * wt[k];
      } else {
        for (int64_t c = 0; c < C; ++c) r[c * kRows + k] = acc_t(0);
        loss[k] = acc_t(0);
      }
    }
  }
};

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace manual_layers
