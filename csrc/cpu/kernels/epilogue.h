// Vectorised element-wise pieces shared by the CPU kernels of Linear (csrc/cpu/kernels/linear.cpp) and
// MLP (csrc/cpu/kernels/mlp.cpp): the 16-bit <-> acc_t loads and stores of vec_io.h, the activations and their
// derivatives, row grains and tile sizes, and the backward epilogue (G = g * act'(saved) with
// the bias-gradient column sums, bitwise deterministic). Included only by the per-ISA kernel
// files: everything lands in manual_layers::CPU_CAPABILITY, in an anonymous namespace (one copy
// per translation unit and ISA).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/vec_convert.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "../../common.h"
#include "vec_io.h"

#ifndef CPU_CAPABILITY
#error "csrc/cpu/kernels/epilogue.h is for the per-ISA kernel files (-DCPU_CAPABILITY=...)"
#endif

namespace manual_layers {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

constexpr double kSqrt1_2 = 0.70710678118654752440;     // 1/sqrt(2)
constexpr double kInvSqrt2Pi = 0.39894228040143267794;  // 1/sqrt(2*pi)
constexpr double kBeta = 0.79788456080286535588;        // sqrt(2/pi)
constexpr double kKappa = 0.044715;

// Exact GELU's cdf Phi(s) = (1 + erf(s/sqrt(2)))/2 for float, through Abramowitz-Stegun 7.1.26
// (|erf error| < 1.5e-7, the formula of ATen's own Vectorized<float>::erf) with the fast exp:
// erf(|a|) = 1 - t poly(t) exp(-a^2), t = 1 / (1 + p |a|). Also returns E = exp(-s^2/2), which
// is the pdf's exp as well, so the derivative needs no second exp.
inline Vectorized<float> gelu_cdf(const Vectorized<float>& s, Vectorized<float>& E) {
  using Vec = Vectorized<float>;
  const Vec one(1.f), half(0.5f);
  E = (Vec(-0.5f) * s * s).exp_u20();
  const Vec t = one / at::vec::fmadd(Vec(0.3275911f * static_cast<float>(kSqrt1_2)), s.abs(), one);
  Vec poly = at::vec::fmadd(Vec(1.061405429f), t, Vec(-1.453152027f));
  poly = at::vec::fmadd(poly, t, Vec(1.421413741f));
  poly = at::vec::fmadd(poly, t, Vec(-0.284496736f));
  poly = at::vec::fmadd(poly, t, Vec(0.254829592f));
  const Vec erf_abs = one - poly * t * E;
  return half * (one + Vec::blendv(erf_abs, erf_abs.neg(), s < Vec(0.f)));
}

// tanh for float through one exp. Above |z| = 0.625, tanh|z| = (1 - e) / (1 + e) with
// e = exp(-2|z|) <= 0.29, so 1 - e does not cancel and exp(-inf) = 0 gives 1; below it the odd
// polynomial z + z^3 P(z^2), P of degree 5 fitted to tanh's relative error on [0, 0.625] (0.75
// ulp evaluated in fp32; z^2 underflows to 0 for tiny z, which then return themselves, -0 too).
// ATen's Vectorized<float>::tanh is Sleef's, several exps' worth of work per vector: it was half
// the time of a bf16 Linear(4096, 1024 -> 1024, "tanh") forward on 2 Xeon cores.
inline Vectorized<float> tanh_float(const Vectorized<float>& z) {
  using Vec = Vectorized<float>;
  const Vec one(1.f), sign_bit(-0.f);
  const Vec a = z.abs();
  const Vec e = (Vec(-2.f) * a).exp();
  const Vec big = (one - e) / (one + e);
  const Vec t = a * a;
  Vec p = at::vec::fmadd(Vec(0.002182707889005542f), t, Vec(-0.008220166899263859f));
  p = at::vec::fmadd(p, t, Vec(0.02171768993139267f));
  p = at::vec::fmadd(p, t, Vec(-0.05394979566335678f));
  p = at::vec::fmadd(p, t, Vec(0.133332297205925f));
  p = at::vec::fmadd(p, t, Vec(-0.3333333134651184f));
  const Vec small = at::vec::fmadd(a * t, p, a);
  // tanh|z| with z's sign bit (-0 stays -0). NaN: a < 0.625 is false and big is NaN.
  return Vec::blendv(big, small, a < Vec(0.625f)) | (z & sign_bit);
}

// sigmoid(x) = 1 / (1 + e), e = exp(-x); with `tau`, also 1 - sigmoid(x) without cancellation:
// e sigmoid = e / (1 + e) where sigmoid >= 1/2 (e <= 1), 1 - sigmoid elsewhere. Overflow goes
// the right way: e = inf gives sigmoid 0 and tau 1.
template <typename acc_t>
inline Vectorized<acc_t> sigmoid_pair(const Vectorized<acc_t>& x,
                                      Vectorized<acc_t>* tau = nullptr) {
  using Vec = Vectorized<acc_t>;
  const Vec one(1);
  const Vec e = x.neg().exp();
  const Vec sig = one / (one + e);
  if (tau != nullptr) *tau = Vec::blendv(one - sig, e * sig, sig >= Vec(0.5));
  return sig;
}

// GELU-tanh through one exp: (1 + tanh(u)) / 2 = sigmoid(2u), u = beta (z + kappa z^3), so
// gelu_tanh(z) = z sig with sig = sigmoid(2u), and 1 - tanh(u)^2 = 4 sig (1 - sig). Same
// function as torch's 0.5 z (1 + tanh(u)), without the cancellation of 1 + tanh(u); a
// vectorised tanh costs about three exps (Sleef; docs/perf-notes-from-code.md).
template <typename acc_t>
inline Vectorized<acc_t> gelu_tanh_sigma(const Vectorized<acc_t>& z,
                                         Vectorized<acc_t>* tau = nullptr) {
  using Vec = Vectorized<acc_t>;
  return sigmoid_pair(Vec(2 * kBeta) * at::vec::fmadd(Vec(kKappa) * z, z * z, z), tau);
}

// Element-wise activation of the pre-activation z.
template <Act A, typename acc_t>
inline Vectorized<acc_t> act_fwd(const Vectorized<acc_t>& z) {
  using Vec = Vectorized<acc_t>;
  const Vec one(1), half(0.5);
  if constexpr (A == Act::None) return z;
  if constexpr (A == Act::Relu) return Vec::blendv(z, Vec(0), z < Vec(0));  // NaN stays NaN
  if constexpr (A == Act::Gelu) {
    if constexpr (std::is_same_v<acc_t, float>) {
      Vec E;
      return z * gelu_cdf(z, E);
    } else {
      return z * half * (one + (z * Vec(kSqrt1_2)).erf());
    }
  }
  if constexpr (A == Act::GeluTanh) return z * gelu_tanh_sigma(z);
  if constexpr (A == Act::Silu) return z / (one + z.neg().exp());
  if constexpr (A == Act::Sigmoid) return one / (one + z.neg().exp());
  if constexpr (A == Act::Tanh) {
    if constexpr (std::is_same_v<acc_t, float>) return tanh_float(z);
    else return z.tanh();
  }
  return z;  // Softmax is row-wise, handled separately.
}

// grad_out * act'(.) from what saved_for(A) keeps: the output y (relu, sigmoid, tanh) or the
// pre-activation z (gelu, gelu_tanh, silu).
template <Act A, typename acc_t>
inline Vectorized<acc_t> act_bwd(const Vectorized<acc_t>& g, const Vectorized<acc_t>& s) {
  using Vec = Vectorized<acc_t>;
  const Vec one(1), half(0.5), zero(0);
  if constexpr (A == Act::None) return g;
  if constexpr (A == Act::Relu) return Vec::blendv(g, zero, s <= zero);  // NaN passes g, as torch
  if constexpr (A == Act::Gelu) {
    if constexpr (std::is_same_v<acc_t, float>) {
      Vec E;
      const Vec cdf = gelu_cdf(s, E);
      return g * at::vec::fmadd(s * E, Vec(kInvSqrt2Pi), cdf);
    } else {
      const Vec cdf = half * (one + (s * Vec(kSqrt1_2)).erf());
      const Vec pdf = (Vec(-0.5) * s * s).exp() * Vec(kInvSqrt2Pi);
      return g * (cdf + s * pdf);
    }
  }
  if constexpr (A == Act::GeluTanh) {
    // d/ds [s sig] = sig + 2 beta s sig (1 - sig) (1 + 3 kappa s^2)
    Vec tau;
    const Vec sig = gelu_tanh_sigma(s, &tau);
    const Vec slope = Vec(2 * kBeta) * at::vec::fmadd(Vec(3 * kKappa), s * s, one);
    return g * at::vec::fmadd(s * sig * tau, slope, sig);
  }
  if constexpr (A == Act::Silu) {  // sig (1 + s (1 - sig))
    Vec tau;
    const Vec sig = sigmoid_pair(s, &tau);
    return g * sig * at::vec::fmadd(s, tau, one);
  }
  if constexpr (A == Act::Sigmoid) return g * s * (one - s);
  if constexpr (A == Act::Tanh) return g * (one - s * s);
  return g;
}

// Rows per parallel task for a row-wise pass over an (N, M) matrix: about 32K elements.
inline int64_t row_grain(int64_t M) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(M, 1)); }

// Rows per tile of the tiled backward: an (R, M) tile of G of about 8 MiB, reused from tile to
// tile, so G is never a fresh (N, M) tensor, whose page faults alone cost a sizeable part of the
// backward. 8 MiB tiles were the fastest measured (smaller ones make the GEMMs too small;
// docs/perf-notes-from-code.md). At least 64 rows, at most N.
inline int64_t tile_rows(int64_t M, int64_t elem_size, int64_t N) {
  const int64_t r = (int64_t(8) << 20) / std::max<int64_t>(1, M * elem_size);
  return std::max<int64_t>(1, std::min(N, std::max<int64_t>(64, r)));
}

template <typename F>
void dispatch_act(Act a, F&& f) {
  switch (a) {
    case Act::None: return f(std::integral_constant<Act, Act::None>{});
    case Act::Relu: return f(std::integral_constant<Act, Act::Relu>{});
    case Act::Gelu: return f(std::integral_constant<Act, Act::Gelu>{});
    case Act::GeluTanh: return f(std::integral_constant<Act, Act::GeluTanh>{});
    case Act::Silu: return f(std::integral_constant<Act, Act::Silu>{});
    case Act::Sigmoid: return f(std::integral_constant<Act, Act::Sigmoid>{});
    case Act::Tanh: return f(std::integral_constant<Act, Act::Tanh>{});
    case Act::Softmax: return f(std::integral_constant<Act, Act::Softmax>{});
  }
}

// ---------------------------------------------------------------------------------------------
// Backward epilogue: G = g * act'(s) (written to `G` unless G == nullptr, i.e. act none) and the
// column sums of G into `db` (if not null). Rows are cut into a fixed number of blocks that does
// not depend on the thread count; each block sums its rows in order, then blocks are added in
// order: the same inputs give bitwise the same bias gradient on any machine configuration.
template <typename scalar_t, Act A>
void bwd_epilogue(const scalar_t* g, const scalar_t* s, scalar_t* G, scalar_t* db, int64_t N,
                  int64_t M) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const int64_t nblk = db ? std::min<int64_t>(64, std::max<int64_t>(1, N / 256)) : 1;
  const int64_t rows_per_blk = (N + nblk - 1) / nblk;
  std::vector<acc_t> partial(db ? nblk * M : 0, acc_t(0));
  auto process_rows = [&](int64_t r0, int64_t r1, acc_t* acc) {
    std::vector<acc_t> rowbuf(A == Act::Softmax ? M : 0);
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* gr = g + r * M;
      const scalar_t* sr = s ? s + r * M : nullptr;
      scalar_t* Gr = G ? G + r * M : nullptr;
      acc_t dot = 0;
      if constexpr (A == Act::Softmax) {  // G = y * (g - sum_j g_j y_j)
        for (int64_t j = 0; j < M; ++j) dot += static_cast<acc_t>(gr[j]) * static_cast<acc_t>(sr[j]);
      }
      for (int64_t j = 0; j < M; j += W) {
        const int64_t n = std::min<int64_t>(W, M - j);
        const Vec gv = load<scalar_t, acc_t>(gr + j, n);
        Vec out;
        if constexpr (A == Act::Softmax) {
          const Vec y = load<scalar_t, acc_t>(sr + j, n);
          out = y * (gv - Vec(dot));
        } else if constexpr (A == Act::None) {
          out = gv;
        } else {
          out = act_bwd<A, acc_t>(gv, load<scalar_t, acc_t>(sr + j, n));
        }
        if (Gr) store<scalar_t, acc_t>(Gr + j, out, n);
        if (acc) {
          // Padding lanes are zero (load pads g and s with zeros; act'(0) * 0 = 0).
          const Vec a = load<acc_t, acc_t>(acc + j, n) + out;
          store<acc_t, acc_t>(acc + j, a, n);
        }
      }
    }
  };
  if (db == nullptr) {  // no bias gradient: a plain row-parallel pass
    at::parallel_for(0, N, row_grain(M), [&](int64_t r0, int64_t r1) { process_rows(r0, r1, nullptr); });
    return;
  }
  at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * rows_per_blk, r1 = std::min(N, r0 + rows_per_blk);
      if (r0 < r1) process_rows(r0, r1, partial.data() + b * M);
    }
  });
  {
    for (int64_t j = 0; j < M; ++j) {
      acc_t sum = 0;
      for (int64_t b = 0; b < nblk; ++b) sum += partial[b * M + j];
      db[j] = static_cast<scalar_t>(sum);
    }
  }
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace manual_layers
