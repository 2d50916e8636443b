// CPU kernels of the fused linear layer y = act(x W^T + b).
//
// Forward: the GEMM through ATen (at::mm -> MKL/oneDNN), then ONE parallel, vectorised pass
// over the (N, M) output that adds the bias (in the accumulation type, fp32 for 16-bit
// dtypes) and applies the activation, writing the pre-activation only when backward needs it.
// With no activation the whole layer is a single at::addmm (bias folded into the GEMM).
//
// Backward: ONE parallel, vectorised pass that computes G = grad_out * act'(saved) and, in the
// same pass, the bias gradient's column sums (per fixed row block, reduced in a fixed order:
// bitwise deterministic whatever the thread count); then the dX = G W and dW = G^T x GEMMs,
// each only if needed.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/vec_convert.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "../linear.h"

// Compiled once per ISA (csrc/cpu_dispatch.cpp explains the dispatch): everything below lives in
// manual_layers::CPU_CAPABILITY (DEFAULT, AVX2 or AVX512), registered by csrc/cpu_dispatch.cpp.
#ifndef CPU_CAPABILITY
#error "csrc/cpu/*.cpp are compiled per ISA with -DCPU_CAPABILITY=DEFAULT|AVX2|AVX512 (setup.py, CMakeLists.txt)"
#endif

namespace manual_layers {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Load n <= Vec::size() elements of T into a vector of the accumulation type (zero-padded).
template <typename T, typename acc_t>
inline Vectorized<acc_t> load(const T* p, int64_t n) {
  using Vec = Vectorized<acc_t>;
  if constexpr (std::is_same_v<T, acc_t>) {
    return n == Vec::size() ? Vec::loadu(p) : Vec::loadu(p, n);
  } else {
    // 16-bit -> float with ATen's vectorised conversion (AVX-512/AVX2: one vcvtph2ps or
    // bf16 shift per vector; DEFAULT: ATen's scalar loop); same values as static_cast.
    if (n == Vec::size()) {
      Vec out;
      at::vec::load_to_float<T>(p, out);
      return out;
    }
    return at::vec::convert<acc_t>(Vectorized<T>::loadu(p, n));
  }
}

template <typename T, typename acc_t>
inline void store(T* p, const Vectorized<acc_t>& v, int64_t n) {
  using Vec = Vectorized<acc_t>;
  if constexpr (std::is_same_v<T, acc_t>) {
    if (n == Vec::size()) v.store(p); else v.store(p, n);
  } else {
    // float -> 16-bit, vectorised, round to nearest even as static_cast<T>(float). A full
    // vector is stored at its own width (256 bits under AVX-512, 128 under AVX2): the generic
    // Vectorized<T>::store(p, n) would be a masked 512-bit (or a memcpy'd 256-bit) store.
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if (n == Vec::size()) {
      const auto h = std::is_same_v<T, c10::BFloat16> ? at::vec::cvtfp32_bf16(v)
                                                      : at::vec::cvtfp32_fp16(v);
#if defined(CPU_CAPABILITY_AVX512)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
#else
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
#endif
      return;
    }
#endif
    at::vec::convert<T>(v).store(p, n);
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
  if constexpr (A == Act::Relu) return Vec::blendv(z, Vec(0), z < Vec(0));  // NaN stays NaN
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

// Rows per tile of the tiled backward: an (R, M) tile of G of about 8 MiB, reused from tile to
// tile, so G is never a fresh (N, M) tensor (at 65536x256->256 fp32 on 2 cores a fresh 64 MiB
// tensor costs ~20 ms of page faults alone). Measured there: backward 101 ms with 1 MiB tiles
// (GEMMs too small), 92 with 4, 85-91 with 8 or 16, 99 with 32, 110 untiled; eager 111-120.
// At least 64 rows, at most N.
inline int64_t tile_rows(int64_t M, int64_t elem_size, int64_t N) {
  const int64_t r = (int64_t(8) << 20) / std::max<int64_t>(1, M * elem_size);
  return std::max<int64_t>(1, std::min(N, std::max<int64_t>(64, r)));
}

// ---------------------------------------------------------------------------------------------
// Forward epilogue: out <- act(src + b), and pre <- src + b when pre is not null. `src` is the
// contiguous GEMM output; out and pre may alias it (each element is read before it is written).
template <typename scalar_t, Act A>
void fwd_epilogue(const scalar_t* src, scalar_t* out, scalar_t* pre, const scalar_t* bias,
                  int64_t N, int64_t M) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  at::parallel_for(0, N, row_grain(M), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* sr = src + r * M;
      scalar_t* yr = out + r * M;
      scalar_t* pr = pre ? pre + r * M : nullptr;
      for (int64_t j = 0; j < M; j += W) {
        const int64_t n = std::min<int64_t>(W, M - j);
        Vec z = load<scalar_t, acc_t>(sr + j, n);
        if (bias) z = z + load<scalar_t, acc_t>(bias + j, n);
        if (pr) store<scalar_t, acc_t>(pr + j, z, n);
        store<scalar_t, acc_t>(yr + j, act_fwd<A, acc_t>(z), n);
      }
    }
  });
}

// Row-wise softmax epilogue (logistic_regression's multinomial probabilities).
template <typename scalar_t>
void softmax_epilogue(scalar_t* y, const scalar_t* bias, int64_t N, int64_t M) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, N, row_grain(M), [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> z(M);
    for (int64_t r = r0; r < r1; ++r) {
      scalar_t* yr = y + r * M;
      acc_t mx = -std::numeric_limits<acc_t>::infinity();
      for (int64_t j = 0; j < M; ++j) {
        z[j] = static_cast<acc_t>(yr[j]) + (bias ? static_cast<acc_t>(bias[j]) : acc_t(0));
        mx = std::max(mx, z[j]);
      }
      acc_t sum = 0;
      for (int64_t j = 0; j < M; ++j) sum += (z[j] = std::exp(z[j] - mx));
      const acc_t inv = acc_t(1) / sum;
      for (int64_t j = 0; j < M; ++j) yr[j] = static_cast<scalar_t>(z[j] * inv);
    }
  });
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

inline at::Tensor empty_like_none(const at::Tensor& x) { return at::empty({0}, x.options()); }

}  // namespace

// ---------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                  const c10::optional<at::Tensor>& bias_opt,
                                                  c10::string_view activation, bool save_pre) {
  check_linear_args("manual_layers.linear_fwd", x, weight, bias_opt);
  TORCH_CHECK(x.device().is_cpu(), "linear_fwd_cpu: x is on ", x.device());
  const Act act = parse_activation(std::string(activation));
  const bool has_bias = bias_opt.has_value() && bias_opt->defined();
  const int64_t N = x.size(0), M = weight.size(0);

  if (act == Act::None) {
    // No epilogue: nn.Linear's own single addmm (bias added inside the GEMM).
    at::Tensor out = has_bias ? at::addmm(*bias_opt, x, weight.t()) : at::mm(x, weight.t());
    return {out.contiguous(), empty_like_none(x)};
  }
  // fp32/fp64: the GEMM, then bias + activation in one pass. 16-bit dtypes: the bias goes
  // inside the GEMM (addmm accumulates in fp32 and rounds once); adding it after the GEMM's
  // result was rounded to 16 bits would lose the accuracy near cancellation (design.md 5).
  const bool bias_in_gemm = has_bias && at::isReducedFloatingType(x.scalar_type());
  const bool keep_pre = save_pre && saved_for(act) == Saved::Pre;
  at::Tensor out = at::empty({N, M}, x.options());
  // With the pre-activation kept, the GEMM writes `pre` (then y + b in place) and the
  // activation goes to `out`; otherwise the activation is applied in place on `out`.
  at::Tensor pre = keep_pre ? at::empty({N, M}, x.options()) : empty_like_none(x);
  at::Tensor gemm_out = keep_pre ? pre : out;
  at::Tensor bias = has_bias && !bias_in_gemm ? bias_opt->contiguous() : at::Tensor();
  // One GEMM over all rows, then the epilogue. (Row tiles, so that the epilogue reads each
  // tile's GEMM output from cache, were measured slower at 65536x256->256 and 8192x1024->1024
  // fp32 on 2 cores: 0.92x with 16 MiB tiles, 0.67-0.71x with 4 MiB, 0.32-0.46x with 1 MiB.)
  if (bias_in_gemm) {
    at::addmm_out(gemm_out, *bias_opt, x, weight.t());
  } else {
    at::mm_out(gemm_out, x, weight.t());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "linear_fwd_cpu", [&] {
    const scalar_t* b = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    if (act == Act::Softmax) {
      softmax_epilogue<scalar_t>(out.data_ptr<scalar_t>(), b, N, M);
      return;
    }
    dispatch_act(act, [&](auto A) {
      if constexpr (decltype(A)::value != Act::Softmax) {
        scalar_t* src = gemm_out.data_ptr<scalar_t>();
        fwd_epilogue<scalar_t, decltype(A)::value>(src, out.data_ptr<scalar_t>(),
                                                   keep_pre ? src : nullptr, b, N, M);
      }
    });
  });
  return {out, pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& saved, c10::string_view activation, bool need_x, bool need_weight,
    bool need_bias) {
  check_linear_args("manual_layers.linear_bwd", x, weight, c10::nullopt);
  const Act act = parse_activation(std::string(activation));
  const int64_t N = x.size(0), M = weight.size(0);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == N && grad_out.size(1) == M,
              "manual_layers.linear_bwd: grad_out must have shape (", N, ", ", M, "), got ",
              grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "manual_layers.linear_bwd: grad_out dtype ",
              grad_out.scalar_type(), " differs from x dtype ", x.scalar_type());
  const bool needs_saved = act != Act::None;
  if (needs_saved) {
    TORCH_CHECK(saved.sizes() == grad_out.sizes(), "manual_layers.linear_bwd: saved tensor for '",
                activation, "' must have shape ", grad_out.sizes(), ", got ", saved.sizes());
  }
  at::Tensor g = grad_out.contiguous();
  at::Tensor s = needs_saved ? saved.contiguous() : at::Tensor();
  at::Tensor db = need_bias ? at::empty({M}, x.options()) : empty_like_none(x);
  const bool need_G = need_x || need_weight;
  if (act == Act::None || !need_G || at::isReducedFloatingType(x.scalar_type())) {
    // Untiled: G is grad_out itself (no activation, or only the bias sums are wanted) or, in
    // 16-bit, one (N, M) tensor, so that dW is one GEMM with fp32 accumulation over all rows.
    const bool write_G = act != Act::None && need_G;
    at::Tensor G = write_G ? at::empty({N, M}, x.options()) : g;
    if (need_bias || write_G) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "linear_bwd_cpu", [&] {
        dispatch_act(act, [&](auto A) {
          bwd_epilogue<scalar_t, decltype(A)::value>(
              g.data_ptr<scalar_t>(), needs_saved ? s.data_ptr<scalar_t>() : nullptr,
              write_G ? G.data_ptr<scalar_t>() : nullptr,
              need_bias ? db.data_ptr<scalar_t>() : nullptr, N, M);
        });
      });
    }
    at::Tensor dx = need_x ? at::mm(G, weight) : empty_like_none(x);
    at::Tensor dw = need_weight ? at::mm(G.t(), x) : empty_like_none(x);
    return {dx, dw, db};
  }
  // fp32/fp64: row tiles. Each tile's G = g * act'(s) (with its bias column sums) is computed
  // into a reused tile buffer and consumed at once by the tile's dX GEMM and by dW += G^T x:
  // G never exists as an (N, M) tensor (no allocation, no round trip to memory). Tiles run in
  // order, so dW and the bias sums are accumulated in a fixed order (deterministic).
  const int64_t K = x.size(1);
  const int64_t R = tile_rows(M, x.element_size(), N);
  at::Tensor Gbuf = at::empty({R, M}, x.options());
  at::Tensor dx = need_x ? at::empty({N, K}, x.options()) : empty_like_none(x);
  at::Tensor dw = need_weight ? at::empty({M, K}, x.options()) : empty_like_none(x);
  at::Tensor db_tile = need_bias ? at::empty({M}, x.options()) : at::Tensor();
  if (need_bias) db.zero_();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear_bwd_cpu", [&] {
    dispatch_act(act, [&](auto A) {
      for (int64_t r0 = 0; r0 < N; r0 += R) {
        const int64_t n = std::min(R, N - r0);
        at::Tensor G = Gbuf.narrow(0, 0, n);
        bwd_epilogue<scalar_t, decltype(A)::value>(
            g.data_ptr<scalar_t>() + r0 * M, s.data_ptr<scalar_t>() + r0 * M,
            G.data_ptr<scalar_t>(), need_bias ? db_tile.data_ptr<scalar_t>() : nullptr, n, M);
        if (need_bias) db.add_(db_tile);
        const at::Tensor xt = x.narrow(0, r0, n);
        if (need_x) {
          at::Tensor dxt = dx.narrow(0, r0, n);
          at::mm_out(dxt, G, weight);
        }
        if (need_weight) {
          if (r0 == 0) {
            at::mm_out(dw, G.t(), xt);
          } else {
            dw.addmm_(G.t(), xt);
          }
        }
      }
    });
  });
  if (need_weight && N == 0) dw.zero_();  // no tile ran
  return {dx, dw, db};
}

}  // namespace CPU_CAPABILITY
}  // namespace manual_layers
