// The CPU row passes of the chunked cross entropy (csrc/generic/ce_chunked.cpp runs the chunk loop and its
// GEMMs and explains the arguments). Per row of the (R, C) logits chunk: + bias, stable
// log-softmax, the loss term and, when asked, the residual written over the logits in place,
// plus the residual's column sums for the bias gradient.
//  - ce_rows_cpu: class-index targets (contract in csrc/contracts/losses.h; class weights, ignore_index,
//    label smoothing);
//  - ce_soft_rows_cpu: probability targets (contract in csrc/contracts/ce_chunked.h; class weights, label
//    smoothing, any real target values).
//
// Compiled once per ISA like every file in csrc/cpu (csrc/cpu/runtime/dispatch.cpp selects the copy): in
// the ISA-neutral csrc/generic/ce_chunked.cpp at::vec would be ATen's generic element loops, several times
// slower.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../../contracts/ce_chunked.h"
#include "../../common.h"
#include "../../contracts/losses.h"
#include "vec_io.h"

#ifndef CPU_CAPABILITY
#error "csrc/cpu/kernels/*.cpp are compiled per ISA with -DCPU_CAPABILITY=DEFAULT|AVX2|AVX512 (setup.py, CMakeLists.txt)"
#endif

namespace manual_layers {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Bias gradient partials: one (C,) acc_t row per block of rows, at most 64 blocks and
// kCeChunkBytes. The blocks are also the pass's units of parallel work then (64 are plenty for
// the threads of one socket).
constexpr int64_t kMaxBiasBlocks = 64;

// Runs rows(i0, i1, part) over the R rows of a chunk, in parallel, and with bias_grad (not null)
// the bias gradient: each block of rows sums its acc_t residuals in row order into its own
// partial part (C,), then the partials are added to bias_grad in block order. The blocks depend
// on R and C only, not on the thread count: bitwise the same on any machine. Without bias_grad,
// part is null.
template <typename acc_t, typename RowsFn>
void for_row_blocks(int64_t R, int64_t C, at::Tensor* bias_grad, const RowsFn& rows) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  if (bias_grad == nullptr) {
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, C));
    at::parallel_for(0, R, grain, [&](int64_t i0, int64_t i1) { rows(i0, i1, nullptr); });
    return;
  }
  const int64_t max_blk = kCeChunkBytes / std::max<int64_t>(1, C * int64_t(sizeof(acc_t)));
  const int64_t nblk = std::max<int64_t>(1, std::min<int64_t>({R, kMaxBiasBlocks, max_blk}));
  const int64_t blk_rows = (R + nblk - 1) / nblk;
  std::vector<acc_t> partial(nblk * C, acc_t(0));
  at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk)
      rows(blk * blk_rows, std::min(R, (blk + 1) * blk_rows), partial.data() + blk * C);
  });
  acc_t* gb = bias_grad->mutable_data_ptr<acc_t>();
  for (int64_t blk = 0; blk < nblk; ++blk) {
    const acc_t* pb = partial.data() + blk * C;
    int64_t c = 0;
    for (; c + V <= C; c += V) (Vec::loadu(gb + c) + Vec::loadu(pb + c)).store(gb + c);
    for (; c < C; ++c) gb[c] += pb[c];
  }
}

template <typename scalar_t, typename acc_t>
void ce_rows_impl(at::Tensor& logits, const at::Tensor& bias, const at::Tensor& target,
                  const at::Tensor& class_weight, const at::Tensor& aux,
                  const at::Tensor& row_scale, at::Tensor& loss_rows, int64_t ignore_index,
                  double label_smoothing, bool write_residual, at::Tensor* bias_grad) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  constexpr bool kSame = std::is_same<scalar_t, acc_t>::value;
  const int64_t R = logits.size(0), C = logits.size(1);
  scalar_t* L = logits.mutable_data_ptr<scalar_t>();
  const acc_t* b = bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr;
  const acc_t* cw = class_weight.defined() ? class_weight.const_data_ptr<acc_t>() : nullptr;
  const acc_t* rs = row_scale.defined() ? row_scale.const_data_ptr<acc_t>() : nullptr;
  const int64_t* tg = target.const_data_ptr<int64_t>();
  acc_t* lo = loss_rows.mutable_data_ptr<acc_t>();
  const acc_t scale = aux.const_data_ptr<acc_t>()[0];
  const acc_t cw_sum = aux.const_data_ptr<acc_t>()[1];
  const acc_t eps = static_cast<acc_t>(label_smoothing);
  const acc_t eps_c = eps / static_cast<acc_t>(C);
  const bool smooth = eps != acc_t(0);
  const auto vmax = [](const Vec& x, const Vec& y) { return at::vec::maximum(x, y); };
  const auto vadd = [](const Vec& x, const Vec& y) { return x + y; };

  // Rows [i0, i1); part: the block's bias partial (C,) or null.
  auto rows = [&](int64_t i0, int64_t i1, acc_t* part) {
    std::vector<acc_t> buf(kSame ? 0 : C);
    for (int64_t i = i0; i < i1; ++i) {
      scalar_t* row = L + i * C;
      const int64_t t = tg[i];
      if (t == ignore_index) {
        lo[i] = acc_t(0);
        if (write_residual) std::fill(row, row + C, scalar_t(0));
        continue;
      }
      acc_t* z;
      if constexpr (kSame) {
        z = reinterpret_cast<acc_t*>(row);
      } else {
        z = buf.data();
        convert_row<scalar_t, acc_t>(row, z, C);
      }
      // pass 1: z += bias; m = max z
      Vec vm(-std::numeric_limits<acc_t>::infinity());
      int64_t c = 0;
      for (; c + V <= C; c += V) {
        Vec v = Vec::loadu(z + c);
        if (b) v = v + Vec::loadu(b + c);
        v.store(z + c);
        vm = at::vec::maximum(vm, v);
      }
      acc_t m = at::vec::vec_reduce_all<acc_t>(vmax, vm);
      for (; c < C; ++c) {
        if (b) z[c] += b[c];
        m = std::max(m, z[c]);
      }
      const acc_t zt = z[t];
      // pass 2: e = exp(z - m) stored over z; s = sum e; smoothing term sum_c w_c (m - z_c)
      Vec vs(0), vsm(0);
      const Vec vmv(m);
      c = 0;
      for (; c + V <= C; c += V) {
        const Vec v = Vec::loadu(z + c);
        if (smooth) {
          const Vec d = vmv - v;
          vsm = vsm + (cw ? d * Vec::loadu(cw + c) : d);
        }
        const Vec e = (v - vmv).exp();
        e.store(z + c);
        vs = vs + e;
      }
      acc_t s = at::vec::vec_reduce_all<acc_t>(vadd, vs);
      acc_t sm = smooth ? at::vec::vec_reduce_all<acc_t>(vadd, vsm) : acc_t(0);
      for (; c < C; ++c) {
        if (smooth) sm += (cw ? cw[c] : acc_t(1)) * (m - z[c]);
        const acc_t e = std::exp(z[c] - m);
        z[c] = e;
        s += e;
      }
      const acc_t lse_m = std::log(s);  // lse - m
      const acc_t wt = cw ? cw[t] : acc_t(1);
      acc_t loss = (acc_t(1) - eps) * wt * (lse_m + m - zt);
      if (smooth) loss += eps_c * (lse_m * cw_sum + sm);
      lo[i] = loss;
      if (!write_residual) continue;
      // pass 3: r_c = coef ([(1-eps) w_t + eps_c sum w] p_c - eps_c w_c) - coef (1-eps) w_t [c==t]
      const acc_t coef = rs ? scale * rs[i] : scale;
      const acc_t a = coef * ((acc_t(1) - eps) * wt + eps_c * cw_sum) / s;
      const acc_t ec = coef * eps_c;
      const Vec va(a), vec_(ec);
      c = 0;
      for (; c + V <= C; c += V) {
        Vec r = Vec::loadu(z + c) * va;
        if (smooth) r = r - (cw ? vec_ * Vec::loadu(cw + c) : vec_);
        r.store(z + c);
      }
      for (; c < C; ++c) {
        acc_t r = z[c] * a;
        if (smooth) r -= ec * (cw ? cw[c] : acc_t(1));
        z[c] = r;
      }
      z[t] -= coef * (acc_t(1) - eps) * wt;
      if (part != nullptr) {
        c = 0;
        for (; c + V <= C; c += V) (Vec::loadu(part + c) + Vec::loadu(z + c)).store(part + c);
        for (; c < C; ++c) part[c] += z[c];
      }
      if constexpr (!kSame) {
        for (c = 0; c < C; c += V) {
          const int64_t n = std::min<int64_t>(V, C - c);
          store<scalar_t, acc_t>(row + c, load<acc_t, acc_t>(z + c, n), n);
        }
      }
    }
  };
  for_row_blocks<acc_t>(R, C, write_residual ? bias_grad : nullptr, rows);
}


// Probability targets (csrc/contracts/ce_chunked.h, ce_soft_rows_cpu): tgt_t is acc_t or the logits'
// 16-bit type (widened per row). Per row three passes over the acc_t row: (1) + bias, max m;
// (2) wq_c = w_c ((1 - eps) q_c + eps / C), S = sum wq, T = sum wq (m - z_c), e_c = exp(z_c - m)
// stored over z, s = sum e; loss = log(s) S + T (every term of T is >= 0 for a probability
// target: no cancellation against the log-sum-exp); (3) residual coef (S e_c / s - wq_c).
template <typename scalar_t, typename acc_t, typename tgt_t>
void ce_soft_rows_impl(at::Tensor& logits, const at::Tensor& bias, const at::Tensor& target,
                       const at::Tensor& class_weight, double scale_d,
                       const at::Tensor& row_scale, at::Tensor& loss_rows,
                       double label_smoothing, bool write_residual, at::Tensor* bias_grad) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  constexpr bool kSame = std::is_same<scalar_t, acc_t>::value;
  constexpr bool kTgtAcc = std::is_same<tgt_t, acc_t>::value;
  const int64_t R = logits.size(0), C = logits.size(1);
  scalar_t* L = logits.mutable_data_ptr<scalar_t>();
  const acc_t* b = bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr;
  const acc_t* cw = class_weight.defined() ? class_weight.const_data_ptr<acc_t>() : nullptr;
  const acc_t* rs = row_scale.defined() ? row_scale.const_data_ptr<acc_t>() : nullptr;
  const tgt_t* tg = target.const_data_ptr<tgt_t>();
  acc_t* lo = loss_rows.mutable_data_ptr<acc_t>();
  const acc_t scale = static_cast<acc_t>(scale_d);
  const acc_t eps = static_cast<acc_t>(label_smoothing);
  const acc_t keep = acc_t(1) - eps, eps_c = eps / static_cast<acc_t>(C);
  const bool smooth = eps != acc_t(0);
  const Vec vkeep(keep), veps_c(eps_c);
  const auto vmax = [](const Vec& x, const Vec& y) { return at::vec::maximum(x, y); };
  const auto vadd = [](const Vec& x, const Vec& y) { return x + y; };
  // w_c q'_c for the V classes from c, and for one class.
  const auto wq_vec = [&](const acc_t* q, int64_t c) {
    Vec v = Vec::loadu(q + c);
    if (smooth) v = v * vkeep + veps_c;
    return cw ? v * Vec::loadu(cw + c) : v;
  };
  const auto wq_one = [&](const acc_t* q, int64_t c) {
    acc_t v = q[c];
    if (smooth) v = v * keep + eps_c;
    return cw ? v * cw[c] : v;
  };

  auto rows = [&](int64_t i0, int64_t i1, acc_t* part) {
    std::vector<acc_t> zbuf(kSame ? 0 : C), qbuf(kTgtAcc ? 0 : C);
    for (int64_t i = i0; i < i1; ++i) {
      scalar_t* row = L + i * C;
      acc_t* z;
      const acc_t* q;
      if constexpr (kSame) {
        z = reinterpret_cast<acc_t*>(row);
      } else {
        z = zbuf.data();
        convert_row<scalar_t, acc_t>(row, z, C);
      }
      if constexpr (kTgtAcc) {
        q = tg + i * C;
      } else {
        convert_row<tgt_t, acc_t>(tg + i * C, qbuf.data(), C);
        q = qbuf.data();
      }
      // pass 1: z += bias; m = max z
      Vec vm(-std::numeric_limits<acc_t>::infinity());
      int64_t c = 0;
      for (; c + V <= C; c += V) {
        Vec v = Vec::loadu(z + c);
        if (b) v = v + Vec::loadu(b + c);
        v.store(z + c);
        vm = at::vec::maximum(vm, v);
      }
      acc_t m = at::vec::vec_reduce_all<acc_t>(vmax, vm);
      for (; c < C; ++c) {
        if (b) z[c] += b[c];
        m = std::max(m, z[c]);
      }
      // pass 2: S = sum wq, T = sum wq (m - z), e = exp(z - m) over z, s = sum e
      Vec vS(0), vT(0), vs(0);
      const Vec vmv(m);
      c = 0;
      for (; c + V <= C; c += V) {
        const Vec v = Vec::loadu(z + c);
        const Vec wq = wq_vec(q, c);
        vS = vS + wq;
        vT = vT + wq * (vmv - v);
        const Vec e = (v - vmv).exp();
        e.store(z + c);
        vs = vs + e;
      }
      acc_t S = at::vec::vec_reduce_all<acc_t>(vadd, vS);
      acc_t T = at::vec::vec_reduce_all<acc_t>(vadd, vT);
      acc_t s = at::vec::vec_reduce_all<acc_t>(vadd, vs);
      for (; c < C; ++c) {
        const acc_t wq = wq_one(q, c);
        S += wq;
        T += wq * (m - z[c]);
        const acc_t e = std::exp(z[c] - m);
        z[c] = e;
        s += e;
      }
      lo[i] = std::log(s) * S + T;
      if (!write_residual) continue;
      // pass 3: r_c = coef (S / s) e_c - coef wq_c
      const acc_t coef = rs ? scale * rs[i] : scale;
      const Vec va(coef * S / s), vcoef(coef);
      c = 0;
      for (; c + V <= C; c += V) (Vec::loadu(z + c) * va - vcoef * wq_vec(q, c)).store(z + c);
      const acc_t a = coef * S / s;
      for (; c < C; ++c) z[c] = z[c] * a - coef * wq_one(q, c);
      if (part != nullptr) {
        c = 0;
        for (; c + V <= C; c += V) (Vec::loadu(part + c) + Vec::loadu(z + c)).store(part + c);
        for (; c < C; ++c) part[c] += z[c];
      }
      if constexpr (!kSame) {
        for (c = 0; c < C; c += V) {
          const int64_t n = std::min<int64_t>(V, C - c);
          store<scalar_t, acc_t>(row + c, load<acc_t, acc_t>(z + c, n), n);
        }
      }
    }
  };
  for_row_blocks<acc_t>(R, C, write_residual ? bias_grad : nullptr, rows);
}
}  // namespace

void ce_rows_cpu(at::Tensor& logits, const at::Tensor& bias, const at::Tensor& target,
                 const at::Tensor& class_weight, const at::Tensor& aux, const at::Tensor& row_scale,
                 at::Tensor& loss_rows, int64_t ignore_index, double label_smoothing,
                 bool write_residual, at::Tensor* bias_grad) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "ce_rows_cpu",
                                  [&] {
                                    using acc_t = at::opmath_type<scalar_t>;
                                    ce_rows_impl<scalar_t, acc_t>(
                                        logits, bias, target, class_weight, aux, row_scale,
                                        loss_rows, ignore_index, label_smoothing, write_residual,
                                        bias_grad);
                                  });
}

void ce_soft_rows_cpu(at::Tensor& logits, const at::Tensor& bias, const at::Tensor& target,
                      const at::Tensor& class_weight, double scale, const at::Tensor& row_scale,
                      at::Tensor& loss_rows, double label_smoothing, bool write_residual,
                      at::Tensor* bias_grad) {
  TORCH_INTERNAL_ASSERT(logits.is_contiguous() && target.is_contiguous() &&
                        target.sizes() == logits.sizes());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, logits.scalar_type(), "ce_soft_rows_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        if (target.scalar_type() == c10::CppTypeToScalarType<acc_t>::value) {
          ce_soft_rows_impl<scalar_t, acc_t, acc_t>(logits, bias, target, class_weight, scale,
                                                    row_scale, loss_rows, label_smoothing,
                                                    write_residual, bias_grad);
          return;
        }
        // The driver (csrc/generic/ce_soft.cpp) converts any other target dtype to acc_t.
        TORCH_INTERNAL_ASSERT(target.scalar_type() == logits.scalar_type());
        if constexpr (!std::is_same<scalar_t, acc_t>::value) {
          ce_soft_rows_impl<scalar_t, acc_t, scalar_t>(logits, bias, target, class_weight, scale,
                                                       row_scale, loss_rows, label_smoothing,
                                                       write_residual, bias_grad);
        }
      });
}

}  // namespace CPU_CAPABILITY
}  // namespace manual_layers
