// Chunked linear + cross entropy for large class counts (an LM head: C = 32000 and more).
//
// The single-pass kernel (csrc/cpu/logreg.cpp) keeps per-block C x D partials and rereads the
// C x D weight for every 4-row block; the GEMM path of csrc/cuda/logreg_gemm.cu holds the N x C
// logits.
// Both are fine for small C and wrong for an LM head. (On the CPU this path also serves mean/sum
// from C = 32 or 64, where its GEMMs beat the single pass's fp32 FMAs: csrc/autograd.cpp,
// ce_use_chunked.) This path runs over the rows in chunks of
// R rows, R chosen so that the R x C logits chunk is at most kChunkBytes (32 MiB), and per chunk:
//
//   1. L = x_c W^T                  GEMM in x's dtype (gemm::mm_out, csrc/cpu_gemm.cpp, into one
//                                   reused chunk buffer; fp32 accumulation for 16-bit). fp16 on
//                                   a CPU without a native fp16 GEMM: the whole loop in fp32
//                                   (W widened once, fp32 logits), dX rounded to fp16 once
//   2. row pass (ce_rows_*):        + bias (acc_t), stable log-softmax, the loss of each row
//                                   (class weights, ignore_index, label smoothing: the formulas
//                                   of csrc/logreg.h), and, when gradients are wanted, the
//                                   residual dloss/dL written over L in place, times the scale
//                                   (1/den for mean, 1 for sum, or grad_output_i for none)
//   3. dX_c = R_c W                 gemm::mm_out straight into rows [s, s + r) of grad_x
//      grad_W += R_c^T x_c          acc_t accumulator (addmm_ in place for fp32/fp64; for 16-bit
//                                   each chunk's GEMM result is rounded once and added in fp32)
//      grad_b += R_c.sum(0)         in acc_t (CPU: summed by the row pass from the acc_t
//                                   residual before it is rounded to x's dtype, per fixed row
//                                   block, the blocks added in order)
//
// Peak extra memory: one R x C chunk (<= 32 MiB) plus the outputs (grad_x N x D, grad_W C x D in
// acc_t, per-row losses N), never N x C. Every reduction runs in a fixed order (chunks in order,
// ATen GEMMs/sums of fixed shapes): bitwise deterministic from run to run.
//
// The mean's denominator, sum of class_weight[t_i] over non-ignored rows, and the residual scale
// are computed with ATen ops on the device before the first chunk (no host sync on CUDA) and
// passed to the row pass as a 2-element acc_t tensor aux = [scale, sum_c class_weight_c] (the CUDA
// row kernel, shared with the GEMM path in csrc/cuda/logreg_gemm.cu, reads only aux[0] and sums
// the class weights itself).
//
// Ops (schemas in csrc/ops.cpp):
//   _linear_ce_chunked_fwd(x, weight, bias, target, class_weight, ignore_index, label_smoothing,
//                          reduction, need_x, need_weight, need_bias)
//       -> (loss, grad_weight, grad_bias, grad_x)
//     mean/sum: loss 0-d acc_t; grad_weight (C, D) acc_t, grad_bias (C,) acc_t and grad_x (N, D)
//     x's dtype, the gradients for grad_output 1 (each only when its need_* flag is set, else an
//     empty (0,) tensor). Backward (csrc/autograd.cpp) scales them by grad_output on the device.
//     none: loss (N,) acc_t, no gradients (grad_output per row is only known in backward).
//   _linear_ce_chunked_bwd(grad_loss, x, weight, bias, target, class_weight, ignore_index,
//                          label_smoothing, need_x, need_weight, need_bias) -> (gx, gw, gb)
//     reduction none only: recomputes the logits chunk by chunk, residual times grad_loss_i;
//     outputs in x's dtype.
//
// The device-generic driver (chunk loop, ATen GEMMs) lives here and serves CPU and CUDA; the row
// pass is ce_rows_cpu (below: at::vec, at::parallel_for over rows) or ce_rows_cuda
// (csrc/cuda/ce_chunked.cu: a warp per row, or a group of lanes per row for C <= 16).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "logreg.h"

namespace manual_layers {

// The row pass: logits (R, C) x's dtype, contiguous, overwritten with the residual when
// write_residual. bias / class_weight: (C,) acc_t or undefined; aux: (2,) acc_t
// [residual scale, sum of class weights]; row_scale: (R,) acc_t or undefined (multiplies the
// residual of each row); loss_rows: (R,) acc_t, the unscaled per-row losses; bias_grad: null
// or a (C,) acc_t tensor to which the residual's column sums are added (in a fixed order).
using CeRowsFn = void (*)(at::Tensor& logits, const at::Tensor& bias, const at::Tensor& target,
                          const at::Tensor& class_weight, const at::Tensor& aux,
                          const at::Tensor& row_scale, at::Tensor& loss_rows,
                          int64_t ignore_index, double label_smoothing, bool write_residual,
                          at::Tensor* bias_grad);

#ifdef WITH_CUDA
void ce_rows_cuda(at::Tensor& logits, const at::Tensor& bias, const at::Tensor& target,
                  const at::Tensor& class_weight, const at::Tensor& aux,
                  const at::Tensor& row_scale, at::Tensor& loss_rows, int64_t ignore_index,
                  double label_smoothing, bool write_residual);
#endif

namespace {

using at::vec::Vectorized;

// Bound of the R x C logits chunk: 32 MiB, a choice (not swept by measurement): large enough
// that the GEMMs are not skinny (R = 262 rows at C = 32000 fp32; 8 MiB would give R < 64), small
// next to the N x C logits it replaces. MANUAL_LAYERS_CE_CHUNK_ROWS=<rows> overrides R
// (the tests use it to put chunk boundaries inside small batches).
constexpr int64_t kChunkBytes = int64_t(32) << 20;

int64_t chunk_rows(int64_t N, int64_t C, int64_t elem) {
  if (const char* env = std::getenv("MANUAL_LAYERS_CE_CHUNK_ROWS")) {
    const long long r = std::atoll(env);
    if (r > 0) return std::max<int64_t>(1, std::min<int64_t>(N, r));
  }
  int64_t r = kChunkBytes / std::max<int64_t>(1, C * elem);
  if (r >= 16) r = r / 16 * 16;  // GEMM-friendly
  return std::max<int64_t>(1, std::min<int64_t>(N, r));
}

// ---------------------------------------------------------------------------------------------
// CPU row pass

// Bias gradient partials of the CPU row pass: one (C,) acc_t row per block of rows, at most 64
// blocks and 32 MiB (the bound of the logits chunk). The blocks are also the row pass's units
// of parallel work then (64 are plenty for the threads of one socket).
constexpr int64_t kMaxBiasBlocks = 64;

template <typename scalar_t, typename acc_t>
void ce_rows_cpu_impl(at::Tensor& logits, const at::Tensor& bias, const at::Tensor& target,
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
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, C));
  // The bias gradient (write_residual only): each block of rows sums its acc_t residuals in row
  // order into its own partial, then the partials are added to bias_grad in block order. The
  // blocks depend on R and C only, not on the thread count: bitwise the same on any machine.
  const bool sum_bias = write_residual && bias_grad != nullptr;
  const int64_t max_blk = kChunkBytes / std::max<int64_t>(1, C * int64_t(sizeof(acc_t)));
  const int64_t nblk =
      sum_bias ? std::max<int64_t>(1, std::min<int64_t>({R, kMaxBiasBlocks, max_blk})) : 1;
  const int64_t blk_rows = (R + nblk - 1) / nblk;
  std::vector<acc_t> partial(sum_bias ? nblk * C : 0, acc_t(0));

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
        at::vec::convert(row, z, C);
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
      acc_t m = -std::numeric_limits<acc_t>::infinity();
      {
        acc_t tmp[V];
        vm.store(tmp);
        for (int64_t k = 0; k < V; ++k) m = std::max(m, tmp[k]);
      }
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
      acc_t s = 0, sm = 0;
      {
        acc_t t1[V], t2[V];
        vs.store(t1);
        vsm.store(t2);
        for (int64_t k = 0; k < V; ++k) {
          s += t1[k];
          sm += t2[k];
        }
      }
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
      // pass 3: r_c = coef * ([(1-eps) w_t + eps_c sum w] p_c - eps_c w_c) - coef (1-eps) w_t [c==t]
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
      if constexpr (!kSame) at::vec::convert(z, row, C);
    }
  };
  if (!sum_bias) {
    at::parallel_for(0, R, grain, [&](int64_t i0, int64_t i1) { rows(i0, i1, nullptr); });
    return;
  }
  at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      rows(b * blk_rows, std::min(R, (b + 1) * blk_rows), partial.data() + b * C);
  });
  acc_t* gb = bias_grad->mutable_data_ptr<acc_t>();
  for (int64_t b = 0; b < nblk; ++b) {
    const acc_t* pb = partial.data() + b * C;
    int64_t c = 0;
    for (; c + V <= C; c += V) (Vec::loadu(gb + c) + Vec::loadu(pb + c)).store(gb + c);
    for (; c < C; ++c) gb[c] += pb[c];
  }
}

void ce_rows_cpu(at::Tensor& logits, const at::Tensor& bias, const at::Tensor& target,
                 const at::Tensor& class_weight, const at::Tensor& aux, const at::Tensor& row_scale,
                 at::Tensor& loss_rows, int64_t ignore_index, double label_smoothing,
                 bool write_residual, at::Tensor* bias_grad) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "ce_rows_cpu",
                                  [&] {
                                    using acc_t = at::opmath_type<scalar_t>;
                                    ce_rows_cpu_impl<scalar_t, acc_t>(
                                        logits, bias, target, class_weight, aux, row_scale,
                                        loss_rows, ignore_index, label_smoothing, write_residual,
                                        bias_grad);
                                  });
}

#ifdef WITH_CUDA
// The CUDA row kernel writes the residual; its column sums are then ATen's (of the residual in
// x's dtype, accumulated in acc_t).
void ce_rows_cuda_sum(at::Tensor& logits, const at::Tensor& bias, const at::Tensor& target,
                      const at::Tensor& class_weight, const at::Tensor& aux,
                      const at::Tensor& row_scale, at::Tensor& loss_rows, int64_t ignore_index,
                      double label_smoothing, bool write_residual, at::Tensor* bias_grad) {
  ce_rows_cuda(logits, bias, target, class_weight, aux, row_scale, loss_rows, ignore_index,
               label_smoothing, write_residual);
  if (write_residual && bias_grad != nullptr)
    bias_grad->add_(logits.sum(0, false, bias_grad->scalar_type()));
}
#else
void ce_rows_no_cuda(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                     const at::Tensor&, const at::Tensor&, at::Tensor&, int64_t, double, bool,
                     at::Tensor*) {
  TORCH_CHECK(false,
              "manual_layers was built without its CUDA kernels (CPU-only build), so it cannot "
              "run on CUDA tensors. Rebuild with a CUDA build of torch and nvcc available: "
              "MANUAL_LAYERS_CUDA=1 pip install --no-build-isolation -e .  "
              "(`python -m manual_layers info` shows the current build)");
}
#endif

// ---------------------------------------------------------------------------------------------
// The device-generic driver

struct Chunked {
  at::Tensor loss_rows, gx, gw, gb, den;
};

// grad_rows defined: backward of reduction none (residual_i *= grad_rows_i, scale 1).
Chunked run_chunked(const at::Tensor& x_in, const at::Tensor& weight,
                    const c10::optional<at::Tensor>& bias, const at::Tensor& target_in,
                    const c10::optional<at::Tensor>& class_weight, int64_t ignore_index,
                    double label_smoothing, int64_t reduction, const at::Tensor& grad_rows,
                    bool need_x, bool need_weight, bool need_bias, CeRowsFn rows_fn) {
  const int64_t N = x_in.size(0), D = x_in.size(1), C = weight.size(0);
  const auto dt = x_in.scalar_type();
  const auto acc = at::toOpMathType(dt);
  const auto acc_opts = x_in.options().dtype(acc);
  const at::Tensor x = x_in.stride(-1) == 1 ? x_in : x_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const bool has_cw = class_weight.has_value() && class_weight->defined();
  const at::Tensor b_acc = bias.has_value() && bias->defined()
                               ? bias->to(acc).contiguous()
                               : at::Tensor();
  const at::Tensor cw_acc = has_cw ? class_weight->to(acc).contiguous() : at::Tensor();

  // aux = [residual scale, sum of class weights], on the device, no host sync.
  at::Tensor cw_sum = has_cw ? cw_acc.sum() : at::full({}, static_cast<double>(C), acc_opts);
  at::Tensor den, scale;
  if (reduction == kMean) {
    const at::Tensor valid = target.ne(ignore_index);
    if (has_cw) {
      const at::Tensor idx = target.masked_fill(valid.logical_not(), 0).clamp(0, std::max<int64_t>(0, C - 1));
      den = (cw_acc.index_select(0, idx) * valid.to(acc)).sum();
    } else {
      den = valid.sum().to(acc);
    }
    // den == 0 (empty batch, every row ignored): NaN loss as in torch, zero gradients.
    scale = at::where(den.ne(0), den.reciprocal(), at::zeros({}, acc_opts));
  } else {
    scale = at::ones({}, acc_opts);
  }
  const at::Tensor aux = at::stack({scale, cw_sum});

  const bool none_fwd = reduction == kNone && !grad_rows.defined();
  const bool want_res = !none_fwd && (need_x || need_weight || need_bias);
  Chunked out;
  out.den = den;
  out.loss_rows = at::empty({N}, acc_opts);
  auto empty = [&](at::ScalarType t) { return at::empty({0}, x.options().dtype(t)); };
  // dX is as large as x: on the CPU from the output cache (memory already mapped; a fresh
  // 128 MiB tensor costs ~35 ms of page faults on the 2-core VMs).
  out.gx = want_res && need_x ? empty_for_write({N, D}, x.options()) : empty(dt);
  out.gw = want_res && need_weight ? at::zeros({C, D}, acc_opts) : empty(acc);
  out.gb = want_res && need_bias ? at::zeros({C}, acc_opts) : empty(acc);
  const at::Tensor rs_all = grad_rows.defined() ? grad_rows.reshape({N}).to(acc).contiguous()
                                                : at::Tensor();
  if (N == 0) return out;

  // fp16 where the GEMMs would widen it to fp32 anyway (gemm::widens: a CPU without a native
  // fp16 GEMM): the loop runs in fp32, W widened once and each chunk's rows as they come, so
  // the logits and residuals are fp32 and only dX is rounded to fp16 (once); gemm:: would
  // otherwise widen W for each of a chunk's three GEMMs and round the logits to fp16.
  const bool f32_loop = gemm::widens(x);
  const auto ldt = f32_loop ? at::kFloat : dt;  // the logits' dtype
  const at::Tensor w = f32_loop ? weight.to(at::kFloat) : weight;
  const int64_t R = chunk_rows(N, C, at::elementSize(ldt));
  at::Tensor buf = at::empty({R, C}, x.options().dtype(ldt));
  const at::Tensor wt = w.t();
  for (int64_t s = 0; s < N; s += R) {
    const int64_t r = std::min(R, N - s);
    const at::Tensor xc = f32_loop ? x.narrow(0, s, r).to(at::kFloat) : x.narrow(0, s, r);
    at::Tensor L = buf.narrow(0, 0, r);
    gemm::mm_out(L, xc, wt);
    at::Tensor lrows = out.loss_rows.narrow(0, s, r);
    const at::Tensor rs = rs_all.defined() ? rs_all.narrow(0, s, r) : at::Tensor();
    rows_fn(L, b_acc, target.narrow(0, s, r), cw_acc, aux, rs, lrows, ignore_index,
            label_smoothing, want_res, want_res && need_bias ? &out.gb : nullptr);
    if (!want_res) continue;
    if (need_x) {
      at::Tensor gxc = out.gx.narrow(0, s, r);
      if (f32_loop) {
        gxc.copy_(at::mm(L, w));
      } else {
        gemm::mm_out(gxc, L, weight);
      }
    }
    if (need_weight) {
      if (ldt == acc) out.gw.addmm_(L.t(), xc);
      else out.gw.add_(gemm::mm(L.t(), xc));
    }
  }
  return out;
}

CeRowsFn rows_for(const at::Tensor& x) {
  if (x.device().is_cpu()) return &ce_rows_cpu;
#ifdef WITH_CUDA
  return &ce_rows_cuda_sum;
#else
  return &ce_rows_no_cuda;
#endif
}

void check_all(const char* op, const at::Tensor& x, const at::Tensor& weight,
               const c10::optional<at::Tensor>& bias, const at::Tensor& target,
               const c10::optional<at::Tensor>& class_weight, int64_t ignore_index,
               double label_smoothing) {
  check_linear_args(op, x, weight, bias);
  const int64_t N = x.size(0), C = weight.size(0);
  TORCH_CHECK(target.dim() == 1 && target.size(0) == N, op, ": target must have shape (", N,
              ",), got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, op,
              ": target must hold int64 class indices, got ", target.scalar_type());
  TORCH_CHECK(target.device() == x.device(), op, ": target is on ", target.device(),
              " but x is on ", x.device());
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
              ": label_smoothing must be between 0.0 and 1.0, got ", label_smoothing);
  if (class_weight.has_value() && class_weight->defined()) {
    TORCH_CHECK(class_weight->dim() == 1 && class_weight->size(0) == C, op,
                ": class_weight must have shape (", C, ",), got ", class_weight->sizes());
    TORCH_CHECK(class_weight->device() == x.device(), op, ": class_weight is on ",
                class_weight->device(), " but x is on ", x.device());
    TORCH_CHECK(at::isFloatingType(class_weight->scalar_type()), op,
                ": class_weight must be floating, got ", class_weight->scalar_type());
  }
  // CPU: range-check the targets here (cheap, no device); CUDA: the row kernel asserts.
  if (x.device().is_cpu()) {
    const at::Tensor t = target.contiguous();
    const int64_t* tp = t.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < N; ++i) {
      const int64_t ti = tp[i];
      if (ti == ignore_index) continue;
      TORCH_CHECK_INDEX(ti >= 0 && ti < C, "Target ", ti, " is out of bounds.");
    }
  }
}

}  // namespace

LossOut linear_ce_chunked_fwd(const at::Tensor& x, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                              const c10::optional<at::Tensor>& class_weight, int64_t ignore_index,
                              double label_smoothing, int64_t reduction, bool need_x,
                              bool need_weight, bool need_bias) {
  constexpr const char* op = "manual_layers._linear_ce_chunked_fwd";
  check_all(op, x, weight, bias, target, class_weight, ignore_index, label_smoothing);
  check_reduction(reduction);
  Chunked c = run_chunked(x, weight, bias, target, class_weight, ignore_index, label_smoothing,
                          reduction, at::Tensor(), need_x, need_weight, need_bias, rows_for(x));
  if (reduction == kNone) {
    auto e = [&] { return at::empty({0}, c.loss_rows.options()); };
    return {c.loss_rows, e(), e(), at::empty({0}, x.options())};
  }
  // The loss: per-row terms summed in double (fixed order), / den for mean (NaN when den == 0).
  at::Tensor total = c.loss_rows.to(at::kDouble).sum();
  if (reduction == kMean) {
    const at::Tensor d = c.den.to(at::kDouble);
    total = at::where(d.ne(0), total / d, at::full({}, std::numeric_limits<double>::quiet_NaN(),
                                                   total.options()));
  }
  return {total.to(c.loss_rows.scalar_type()), c.gw, c.gb, c.gx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_ce_chunked_bwd(
    const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& target,
    const c10::optional<at::Tensor>& class_weight, int64_t ignore_index, double label_smoothing,
    bool need_x, bool need_weight, bool need_bias) {
  constexpr const char* op = "manual_layers._linear_ce_chunked_bwd";
  check_all(op, x, weight, bias, target, class_weight, ignore_index, label_smoothing);
  TORCH_CHECK(grad_loss.numel() == x.size(0), op, ": grad_loss must have ", x.size(0),
              " elements (one per row), got shape ", grad_loss.sizes());
  Chunked c = run_chunked(x, weight, bias, target, class_weight, ignore_index, label_smoothing,
                          kNone, grad_loss, need_x, need_weight, need_bias, rows_for(x));
  const auto dt = x.scalar_type();
  auto e = [&] { return at::empty({0}, x.options()); };
  return {need_x ? c.gx : e(), need_weight ? c.gw.to(dt) : e(), need_bias ? c.gb.to(dt) : e()};
}

}  // namespace manual_layers

// One driver for both devices (the row pass is chosen by x's device); in a CPU-only build the
// CUDA row pass raises the "built without CUDA" error.
TORCH_LIBRARY_IMPL(manual_layers, CPU, m) {
  m.impl("_linear_ce_chunked_fwd", &manual_layers::linear_ce_chunked_fwd);
  m.impl("_linear_ce_chunked_bwd", &manual_layers::linear_ce_chunked_bwd);
}
TORCH_LIBRARY_IMPL(manual_layers, CUDA, m) {
  m.impl("_linear_ce_chunked_fwd", &manual_layers::linear_ce_chunked_fwd);
  m.impl("_linear_ce_chunked_bwd", &manual_layers::linear_ce_chunked_bwd);
}
