// CPU kernel of the losses' dX for small C (loss_dx_cpu, csrc/contracts/losses.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <vector>

#include "../../common.h"
#include "../../contracts/losses.h"
#include "loss_tiles.h"
#include "vec_io.h"

#ifndef CPU_CAPABILITY
#error "csrc/cpu/kernels/*.cpp are compiled per ISA with -DCPU_CAPABILITY=DEFAULT|AVX2|AVX512 (setup.py, CMakeLists.txt)"
#endif

namespace manual_layers {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// dX = coef * residual W for the backward of a small-C loss (csrc/generic/loss_bwd.cpp chooses it):
// dX_i = sum_c (coef_i r_ic) W_c, classes in order, acc_t accumulation, one rounding to x's
// dtype. ATen's GEMM is slow at this shape (K = C <= 32: several times a copy of dX,
// docs/perf-notes-from-code.md); here each output row is written once from registers, four
// rows per W load. Rows are independent, so the result does not depend on the thread count.
namespace {
template <typename scalar_t>
void loss_dx_kernel(const at::Tensor& residual, const at::Tensor& coef, const at::Tensor& weight,
                    at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  constexpr int64_t R = kTile;
  const int64_t N = residual.size(0), C = residual.size(1), D = weight.size(1);
  const int64_t Dp = (D + V - 1) / V * V;
  const at::Tensor Wt = padded_acc_weight(weight, Dp);
  const acc_t* Wp = Wt.const_data_ptr<acc_t>();
  const acc_t* r = residual.const_data_ptr<acc_t>();
  const acc_t* cf = coef.const_data_ptr<acc_t>();
  const bool per_row = coef.numel() != 1;
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, (N + R - 1) / R, 64, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> a(R * C);  // a[k * C + c] = coef_i r_ic for the block's rows
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i0 = t * R, nr = std::min(R, N - i0);
      for (int64_t k = 0; k < R; ++k)
        for (int64_t c = 0; c < C; ++c)
          a[k * C + c] = k < nr ? (per_row ? cf[i0 + k] : cf[0]) * r[(i0 + k) * C + c] : acc_t(0);
      for (int64_t d = 0; d < Dp; d += V) {
        Vec acc0(0), acc1(0), acc2(0), acc3(0);
        for (int64_t c = 0; c < C; ++c) {
          const Vec w = Vec::loadu(Wp + c * Dp + d);
          acc0 = at::vec::fmadd(Vec(a[c]), w, acc0);
          acc1 = at::vec::fmadd(Vec(a[C + c]), w, acc1);
          acc2 = at::vec::fmadd(Vec(a[2 * C + c]), w, acc2);
          acc3 = at::vec::fmadd(Vec(a[3 * C + c]), w, acc3);
        }
        const int64_t len = std::min<int64_t>(V, D - d);
        const Vec accs[R] = {acc0, acc1, acc2, acc3};
        for (int64_t k = 0; k < nr; ++k) store<scalar_t, acc_t>(o + (i0 + k) * D + d, accs[k], len);
      }
    }
  });
}
}  // namespace

at::Tensor loss_dx_cpu(const at::Tensor& residual, const at::Tensor& coef,
                       const at::Tensor& weight) {
  at::Tensor out = empty_for_write({residual.size(0), weight.size(1)}, weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "loss_dx_cpu", [&] {
    loss_dx_kernel<scalar_t>(residual.contiguous(), coef.contiguous(), weight, out);
  });
  return out;
}

}  // namespace CPU_CAPABILITY
}  // namespace manual_layers
