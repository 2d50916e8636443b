// CPU kernels of the fused linear layer y = act(x W^T + b).
//
// Forward: the GEMM through ATen (gemm::mm -> MKL/oneDNN; fp16 as fp32 where ATen's fp16 GEMM
// is slow, csrc/cpu/runtime/gemm.cpp), then ONE parallel, vectorised pass over the (N, M) output that
// adds the bias (in the accumulation type, fp32 for 16-bit dtypes) and applies the activation,
// writing the pre-activation only when backward needs it. With no activation the whole layer is
// a single gemm::addmm (bias folded into the GEMM).
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

#include "../../common.h"
#include "../../contracts/linear.h"
#include "epilogue.h"

// Compiled once per ISA (csrc/cpu/runtime/dispatch.cpp explains the dispatch): everything below lives in
// manual_layers::CPU_CAPABILITY (DEFAULT, AVX2 or AVX512), registered by csrc/cpu/runtime/dispatch.cpp.
#ifndef CPU_CAPABILITY
#error "csrc/cpu/kernels/*.cpp are compiled per ISA with -DCPU_CAPABILITY=DEFAULT|AVX2|AVX512 (setup.py, CMakeLists.txt)"
#endif

namespace manual_layers {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// The shared pieces (activations, tiles, the backward epilogue) are in csrc/cpu/kernels/epilogue.h, the
// 16-bit loads/stores in csrc/cpu/kernels/vec_io.h.

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
    at::Tensor out = has_bias ? gemm::addmm(*bias_opt, x, weight.t()) : gemm::mm(x, weight.t());
    return {out.contiguous(), empty_like_none(x)};
  }
  // fp32/fp64: the GEMM, then bias + activation in one pass. 16-bit dtypes: the bias goes
  // inside the GEMM (addmm accumulates in fp32 and rounds once); adding it after the GEMM's
  // result was rounded to 16 bits would lose the accuracy near cancellation.
  const bool bias_in_gemm = has_bias && at::isReducedFloatingType(x.scalar_type());
  const bool keep_pre = save_pre && saved_for(act) == Saved::Pre;
  at::Tensor out = empty_for_write({N, M}, x.options());
  // With the pre-activation kept, the GEMM writes `pre` (then y + b in place) and the
  // activation goes to `out`; otherwise the activation is applied in place on `out`.
  at::Tensor pre = keep_pre ? empty_for_write({N, M}, x.options()) : empty_like_none(x);
  at::Tensor gemm_out = keep_pre ? pre : out;
  at::Tensor bias = has_bias && !bias_in_gemm ? bias_opt->contiguous() : at::Tensor();
  // One GEMM over all rows, then the epilogue. (Row tiles, so that the epilogue reads each
  // tile's GEMM output from cache, were measured slower: docs/perf-notes-from-code.md.)
  if (bias_in_gemm) {
    gemm::addmm_out(gemm_out, *bias_opt, x, weight.t());
  } else {
    gemm::mm_out(gemm_out, x, weight.t());
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
    at::Tensor G = write_G ? empty_for_write({N, M}, x.options()) : g;
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
    at::Tensor dx = need_x ? gemm::mm(G, weight) : empty_like_none(x);
    at::Tensor dw = need_weight ? gemm::mm(G.t(), x) : empty_like_none(x);
    return {dx, dw, db};
  }
  // fp32/fp64: row tiles. Each tile's G = g * act'(s) (with its bias column sums) is computed
  // into a reused tile buffer and consumed at once by the tile's dX GEMM and by dW += G^T x:
  // G never exists as an (N, M) tensor (no allocation, no round trip to memory). Tiles run in
  // order, so dW and the bias sums are accumulated in a fixed order (deterministic).
  const int64_t K = x.size(1);
  const int64_t R = tile_rows(M, x.element_size(), N);
  at::Tensor Gbuf = at::empty({R, M}, x.options());
  at::Tensor dx = need_x ? empty_for_write({N, K}, x.options()) : empty_like_none(x);
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
          gemm::mm_out(dxt, G, weight);
        }
        if (need_weight) {
          if (r0 == 0) {
            gemm::mm_out(dw, G.t(), xt);
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
