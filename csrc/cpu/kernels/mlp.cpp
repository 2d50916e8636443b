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
// The epilogue (bwd_epilogue, the vector activation derivatives) is csrc/cpu/kernels/epilogue.h, shared
// with csrc/cpu/kernels/linear.cpp.
//
// CUDA (and any other device): csrc/generic/mlp_bwd.cpp, the composition of _linear_bwd twice.
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

#include "../../common.h"
#include "../../contracts/mlp.h"
#include "epilogue.h"

namespace manual_layers {
namespace CPU_CAPABILITY {  // compiled once per ISA (csrc/cpu/runtime/dispatch.cpp)
namespace {
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

  at::Tensor gw2 = need_w2 ? gemm::mm(g.t(), h) : none_like(x);
  at::Tensor gb2 = need_b2 ? at::empty({O}, x.options()) : none_like(x);
  at::Tensor gx = need_x ? empty_for_write({N, K}, x.options()) : none_like(x);
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
          at::Tensor G = gemm::mm(g, w2);  // dH (N, H), turned into G1 in place
          bwd_epilogue<scalar_t, kA>(G.const_data_ptr<scalar_t>(), sp,
                                     kA != Act::None && need_G ? G.mutable_data_ptr<scalar_t>()
                                                               : nullptr,
                                     need_b1 ? gb1.mutable_data_ptr<scalar_t>() : nullptr, N, H);
          if (need_x) gemm::mm_out(gx, G, w1);
          if (need_w1) gemm::mm_out(gw1, G.t(), xc);
          return;
        }
        const int64_t R = tile_rows(H, x.element_size(), N);
        at::Tensor Gbuf = at::empty({R, H}, x.options());
        at::Tensor db_tile = need_b1 ? at::empty({H}, x.options()) : at::Tensor();
        if (need_b1) gb1.zero_();
        for (int64_t r0 = 0; r0 < N; r0 += R) {
          const int64_t n = std::min(R, N - r0);
          at::Tensor G = Gbuf.narrow(0, 0, n);
          gemm::mm_out(G, g.narrow(0, r0, n), w2);
          if (kA != Act::None || need_b1) bwd_epilogue<scalar_t, kA>(G.const_data_ptr<scalar_t>(), sp ? sp + r0 * H : nullptr,
                                     kA != Act::None && need_G ? G.mutable_data_ptr<scalar_t>()
                                                               : nullptr,
                                     need_b1 ? db_tile.mutable_data_ptr<scalar_t>() : nullptr,
                                     n, H);
          if (need_b1) gb1.add_(db_tile);
          if (need_x) {
            at::Tensor gxt = gx.narrow(0, r0, n);
            gemm::mm_out(gxt, G, w1);
          }
          if (need_w1) {
            const at::Tensor xt = xc.narrow(0, r0, n);
            if (r0 == 0) gemm::mm_out(gw1, G.t(), xt);
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
