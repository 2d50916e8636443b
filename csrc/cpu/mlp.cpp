// _mlp_bwd: the backward of manual_layers.MLP (Linear -> activation -> Linear) as ONE op.
//
// Shapes: x (N, K), w1 (H, K), w2 (O, H), h = act(x w1^T + b1) (N, H), grad_out g (N, O);
// saved: what act' needs (the pre-activation for gelu/gelu_tanh/silu, h for
// relu/sigmoid/tanh, nothing for none; csrc/common.h saved_for).
//
// CPU, fp32/fp64: dW2 = g^T h (one GEMM), db2 = column sums of g (fixed-order blocks); then row
// tiles of R rows (an R x H tile of about 8 MiB, reused): per tile
//     dH_t = g_t W2                (GEMM into the tile buffer)
//     G1_t = dH_t * act'(saved_t)  in place, with db1's column sums in the same pass
//     dX_t = G1_t W1               (GEMM straight into grad_x's rows)
//     dW1 += G1_t^T x_t            (accumulating GEMM, tiles in order: deterministic)
// so the (N, H) dH / G1 never exist whole. 16-bit: dH and G1 are whole (N, H) tensors so that
// dW1 is one GEMM with fp32 accumulation over all rows (as linear_bwd_cpu does).
// The epilogue helpers below are copied from csrc/cpu/linear.cpp (bwd_epilogue and the vector
// activation derivatives): that file belongs to the Linear kernels and is changed separately.
//
// CUDA (and any other device): csrc/mlp_composed.cpp, the composition of _linear_bwd twice.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "../mlp.h"

namespace manual_layers {
namespace CPU_CAPABILITY {  // compiled once per ISA (csrc/cpu_dispatch.cpp)
namespace {

using at::vec::Vectorized;

// Load n <= Vec::size() elements of T into a vector of the accumulation type (zero-padded).
template <typename T, typename acc_t>
inline Vectorized<acc_t> load(const T* p, int64_t n) {
  using Vec = Vectorized<acc_t>;
  if constexpr (std::is_same_v<T, acc_t>) {
    return n == Vec::size() ? Vec::loadu(p) : Vec::loadu(p, n);
  } else {
    acc_t tmp[Vec::size()] = {};
    for (int64_t i = 0; i < n; ++i) tmp[i] = static_cast<acc_t>(p[i]);
    return Vec::loadu(tmp);
  }
}

template <typename T, typename acc_t>
inline void store(T* p, const Vectorized<acc_t>& v, int64_t n) {
  using Vec = Vectorized<acc_t>;
  if constexpr (std::is_same_v<T, acc_t>) {
    if (n == Vec::size()) v.store(p); else v.store(p, n);
  } else {
    acc_t tmp[Vec::size()];
    v.store(tmp);
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(tmp[i]);
  }
}

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

// Element-wise activation of the pre-activation z.
template <Act A, typename acc_t>
inline Vectorized<acc_t> act_fwd(const Vectorized<acc_t>& z) {
  using Vec = Vectorized<acc_t>;
  const Vec one(1), half(0.5);
  if constexpr (A == Act::None) return z;
  if constexpr (A == Act::Relu) return at::vec::clamp_min(z, Vec(0));
  if constexpr (A == Act::Gelu) {
    if constexpr (std::is_same_v<acc_t, float>) {
      Vec E;
      return z * gelu_cdf(z, E);
    } else {
      return z * half * (one + (z * Vec(kSqrt1_2)).erf());
    }
  }
  if constexpr (A == Act::GeluTanh) {
    const Vec inner = Vec(kBeta) * (z + Vec(kKappa) * z * z * z);
    return half * z * (one + inner.tanh());
  }
  if constexpr (A == Act::Silu) return z / (one + z.neg().exp());
  if constexpr (A == Act::Sigmoid) return one / (one + z.neg().exp());
  if constexpr (A == Act::Tanh) return z.tanh();
  return z;  // Softmax is row-wise, handled separately.
}

// grad_out * act'(.) from what saved_for(A) keeps: the output y (relu, sigmoid, tanh) or the
// pre-activation z (gelu, gelu_tanh, silu).
template <Act A, typename acc_t>
inline Vectorized<acc_t> act_bwd(const Vectorized<acc_t>& g, const Vectorized<acc_t>& s) {
  using Vec = Vectorized<acc_t>;
  const Vec one(1), half(0.5), zero(0);
  if constexpr (A == Act::None) return g;
  if constexpr (A == Act::Relu) return Vec::blendv(zero, g, s > zero);
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
    const Vec s2 = s * s;
    const Vec t = (Vec(kBeta) * (s + Vec(kKappa) * s2 * s)).tanh();
    const Vec left_d = half * (one + t);
    const Vec right_d = half * s * (one - t * t) * Vec(kBeta) * (one + Vec(3 * kKappa) * s2);
    return g * (left_d + right_d);
  }
  if constexpr (A == Act::Silu) {
    const Vec sig = one / (one + s.neg().exp());
    return g * sig * (one + s * (one - sig));
  }
  if constexpr (A == Act::Sigmoid) return g * s * (one - s);
  if constexpr (A == Act::Tanh) return g * (one - s * s);
  return g;
}

// Rows per parallel task for a row-wise pass over an (N, M) matrix: about 32K elements.
inline int64_t row_grain(int64_t M) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(M, 1)); }

// Rows per tile: an (R, H) tile of about 8 MiB (linear_bwd_cpu's measured best), at least 64.
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
    default: TORCH_CHECK_VALUE(false, "manual_layers.mlp: activation not supported");
  }
}

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

inline at::Tensor none_like(const at::Tensor& x) { return at::empty({0}, x.options()); }


}  // namespace

MlpGrads mlp_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1,
                     const at::Tensor& w2, const at::Tensor& h, const at::Tensor& saved,
                     c10::string_view activation, bool need_x, bool need_w1, bool need_b1,
                     bool need_w2, bool need_b2) {
  const Act act = parse_activation(std::string(activation));
  TORCH_CHECK_VALUE(act != Act::Softmax, "manual_layers.mlp: activation 'softmax' not supported");
  check_mlp_bwd(grad_out, x, w1, w2, h, saved, act);
  const int64_t N = x.size(0), K = x.size(1), H = w1.size(0), O = w2.size(0);
  const at::Tensor g = grad_out.contiguous();
  const at::Tensor s = act != Act::None ? saved.contiguous() : at::Tensor();
  const at::Tensor xc = x.stride(-1) == 1 ? x : x.contiguous();

  at::Tensor gw2 = need_w2 ? at::mm(g.t(), h) : none_like(x);
  at::Tensor gb2 = need_b2 ? at::empty({O}, x.options()) : none_like(x);
  at::Tensor gx = need_x ? at::empty({N, K}, x.options()) : none_like(x);
  at::Tensor gw1 = need_w1 ? at::empty({H, K}, x.options()) : none_like(x);
  at::Tensor gb1 = need_b1 ? at::empty({H}, x.options()) : none_like(x);
  const bool first = need_x || need_w1 || need_b1;
  const bool need_G = need_x || need_w1;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "mlp_bwd_cpu", [&] {
    if (need_b2) {
      bwd_epilogue<scalar_t, Act::None>(g.const_data_ptr<scalar_t>(), nullptr, nullptr,
                                        gb2.mutable_data_ptr<scalar_t>(), N, O);
    }
    if (!first) return;
    dispatch_act(act, [&](auto A) {
      constexpr Act kA = decltype(A)::value;
      if constexpr (kA != Act::Softmax) {
        const scalar_t* sp = act != Act::None ? s.const_data_ptr<scalar_t>() : nullptr;
        if (at::isReducedFloatingType(x.scalar_type()) || N == 0) {
          at::Tensor G = at::mm(g, w2);  // dH (N, H), turned into G1 in place
          bwd_epilogue<scalar_t, kA>(G.const_data_ptr<scalar_t>(), sp,
                                     kA != Act::None && need_G ? G.mutable_data_ptr<scalar_t>()
                                                               : nullptr,
                                     need_b1 ? gb1.mutable_data_ptr<scalar_t>() : nullptr, N, H);
          if (need_x) at::mm_out(gx, G, w1);
          if (need_w1) at::mm_out(gw1, G.t(), xc);
          return;
        }
        const int64_t R = tile_rows(H, x.element_size(), N);
        at::Tensor Gbuf = at::empty({R, H}, x.options());
        at::Tensor db_tile = need_b1 ? at::empty({H}, x.options()) : at::Tensor();
        if (need_b1) gb1.zero_();
        for (int64_t r0 = 0; r0 < N; r0 += R) {
          const int64_t n = std::min(R, N - r0);
          at::Tensor G = Gbuf.narrow(0, 0, n);
          at::mm_out(G, g.narrow(0, r0, n), w2);
          if (kA != Act::None || need_b1) bwd_epilogue<scalar_t, kA>(G.const_data_ptr<scalar_t>(), sp ? sp + r0 * H : nullptr,
                                     kA != Act::None && need_G ? G.mutable_data_ptr<scalar_t>()
                                                               : nullptr,
                                     need_b1 ? db_tile.mutable_data_ptr<scalar_t>() : nullptr,
                                     n, H);
          if (need_b1) gb1.add_(db_tile);
          if (need_x) {
            at::Tensor gxt = gx.narrow(0, r0, n);
            at::mm_out(gxt, G, w1);
          }
          if (need_w1) {
            const at::Tensor xt = xc.narrow(0, r0, n);
            if (r0 == 0) at::mm_out(gw1, G.t(), xt);
            else gw1.addmm_(G.t(), xt);
          }
        }
      }
    });
  });
  return {gx, gw1, gb1, gw2, gb2};
}

}  // namespace CPU_CAPABILITY
}  // namespace manual_layers
