// Chunked linear + cross entropy for large class counts (an LM head: C = 32000 and more).
//
// The single-pass kernel (csrc/cpu/kernels/losses.cpp) keeps per-block C x D partials and rereads the
// C x D weight for every 4-row block; the GEMM path of csrc/cuda/losses/gemm_path.cu holds the N x C
// logits.
// Both are fine for small C and wrong for an LM head. (On the CPU this path also serves mean/sum
// from C = 32 or 64, where its GEMMs beat the single pass's fp32 FMAs: csrc/autograd.cpp,
// ce_use_chunked.) This path runs over the rows in chunks of
// R rows, R chosen so that the R x C logits chunk is at most kCeChunkBytes (32 MiB), and per
// chunk:
//
//   1. L = x_c W^T                  GEMM in x's dtype (gemm::mm_out, csrc/cpu/runtime/gemm.cpp, into one
//                                   reused chunk buffer; fp32 accumulation for 16-bit). fp16 on
//                                   a CPU without a native fp16 GEMM: the whole loop in fp32
//                                   (W widened once, fp32 logits), dX rounded to fp16 once
//   2. row pass (ce_rows_*):        + bias (acc_t), stable log-softmax, the loss of each row
//                                   (class weights, ignore_index, label smoothing: the formulas
//                                   of csrc/contracts/losses.h), and, when gradients are wanted, the
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
// row kernel, shared with the GEMM path in csrc/cuda/losses/gemm_path.cu, reads only aux[0] and sums
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
// Probability targets (soft labels: distillation, mixup), F.cross_entropy(x W^T + b, q,
// weight=class_weight, label_smoothing=eps, reduction) with q a float (N, C) tensor
// (csrc/generic/ce_soft.cpp):
//   _linear_ce_soft_fwd(x, weight, bias, target, class_weight, label_smoothing, reduction,
//                       need_x, need_weight, need_bias) -> (loss, grad_weight, grad_bias, grad_x)
//   _linear_ce_soft_bwd(grad_loss, x, weight, bias, target, class_weight, label_smoothing,
//                       need_x, need_weight, need_bias) -> (gx, gw, gb)
//     The outputs, flags and reductions as the two ops above. torch's semantics (LossNLL.cpp,
//     cross_entropy_loss_prob_target): q' = (1 - eps) q + eps / C, loss_i = -sum_c w_c q'_ic
//     log softmax(z_i)_c, mean divides by N (not by a weight sum; N = 0: NaN), no ignore_index;
//     q may hold any real values (any float dtype, read in acc_t). dloss_i/dz_i =
//     (sum_c w_c q'_ic) softmax(z_i) - w * q'_i. No gradient for the target.
//
// The device-generic driver (chunk loop, ATen GEMMs; run_chunks, csrc/contracts/ce_chunked.h) lives here
// and serves CPU and CUDA and both target kinds; the row pass of class indices is ce_rows_cpu
// (csrc/cpu/kernels/ce_rows.cpp, compiled per ISA: at::vec, at::parallel_for over rows) or ce_rows_cuda
// (csrc/cuda/losses/ce_chunked_rows.cu: a warp per row, or a group of lanes per row for C <= 16); that of
// probability targets ce_soft_rows_cpu (the same file) or, on CUDA, ce_soft_rows_aten (ATen ops,
// csrc/generic/ce_soft.cpp).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <limits>

#include "../contracts/ce_chunked.h"
#include "../checks.h"
#include "../common.h"
#include "../contracts/losses.h"

namespace manual_layers {

// The row pass of one chunk: ce_rows_cpu's contract (csrc/contracts/losses.h), on either device.
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

// R: the rows of a chunk of at most kCeChunkBytes (csrc/contracts/losses.h, 32 MiB) of logits.
// MANUAL_LAYERS_CE_CHUNK_ROWS=<rows> overrides it (the tests use it to put chunk boundaries
// inside small batches).
int64_t chunk_rows(int64_t N, int64_t C, int64_t elem) {
  if (const char* env = std::getenv("MANUAL_LAYERS_CE_CHUNK_ROWS")) {
    const long long r = std::atoll(env);
    if (r > 0) return std::max<int64_t>(1, std::min<int64_t>(N, r));
  }
  int64_t r = kCeChunkBytes / std::max<int64_t>(1, C * elem);
  if (r >= 16) r = r / 16 * 16;  // GEMM-friendly
  return std::max<int64_t>(1, std::min<int64_t>(N, r));
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
  ce_no_cuda_build();
}
#endif

}  // namespace

void ce_no_cuda_build() {
  TORCH_CHECK(false,
              "manual_layers was built without its CUDA kernels (CPU-only build), so it cannot "
              "run on CUDA tensors. Rebuild with a CUDA build of torch and nvcc available: "
              "MANUAL_LAYERS_CUDA=1 pip install --no-build-isolation -e .  "
              "(`python -m manual_layers info` shows the current build)");
}

// ---------------------------------------------------------------------------------------------
// The device-generic driver (csrc/contracts/ce_chunked.h)

ChunkedOut run_chunks(const at::Tensor& x_in, const at::Tensor& weight, int64_t reduction,
                      const at::Tensor& grad_rows, bool need_x, bool need_weight, bool need_bias,
                      ChunkRows rows) {
  const int64_t N = x_in.size(0), D = x_in.size(1), C = weight.size(0);
  const auto dt = x_in.scalar_type();
  const auto acc = at::toOpMathType(dt);
  const auto acc_opts = x_in.options().dtype(acc);
  const at::Tensor x = x_in.stride(-1) == 1 ? x_in : x_in.contiguous();

  const bool none_fwd = reduction == kNone && !grad_rows.defined();
  const bool want_res = !none_fwd && (need_x || need_weight || need_bias);
  ChunkedOut out;
  out.loss_rows = at::empty({N}, acc_opts);
  auto empty = [&](at::ScalarType t) { return at::empty({0}, x.options().dtype(t)); };
  // dX is as large as x: on the CPU from the output cache (memory already mapped; a fresh
  // tensor this large pays its page faults: docs/perf-notes-from-code.md).
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
    rows(L, s, rs, lrows, want_res, want_res && need_bias ? &out.gb : nullptr);
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

at::Tensor reduce_chunk_losses(const at::Tensor& loss_rows, int64_t reduction,
                               const at::Tensor& den) {
  at::Tensor total = loss_rows.to(at::kDouble).sum();
  if (reduction == kMean) {
    const at::Tensor d = den.to(at::kDouble);
    total = at::where(d.ne(0), total / d, at::full({}, std::numeric_limits<double>::quiet_NaN(),
                                                   total.options()));
  }
  return total.to(loss_rows.scalar_type());
}

namespace {

// ---------------------------------------------------------------------------------------------
// Class-index targets

struct Chunked {
  ChunkedOut o;
  at::Tensor den;
};

// grad_rows defined: backward of reduction none (residual_i *= grad_rows_i, scale 1).
Chunked run_chunked(const at::Tensor& x, const at::Tensor& weight,
                    const c10::optional<at::Tensor>& bias, const at::Tensor& target_in,
                    const c10::optional<at::Tensor>& class_weight, int64_t ignore_index,
                    double label_smoothing, int64_t reduction, const at::Tensor& grad_rows,
                    bool need_x, bool need_weight, bool need_bias, CeRowsFn rows_fn) {
  const int64_t C = weight.size(0);
  const auto acc = at::toOpMathType(x.scalar_type());
  const auto acc_opts = x.options().dtype(acc);
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

  auto rows = [&](at::Tensor& L, int64_t s, const at::Tensor& rs, at::Tensor& lrows,
                  bool write_residual, at::Tensor* bias_grad) {
    rows_fn(L, b_acc, target.narrow(0, s, L.size(0)), cw_acc, aux, rs, lrows, ignore_index,
            label_smoothing, write_residual, bias_grad);
  };
  return {run_chunks(x, weight, reduction, grad_rows, need_x, need_weight, need_bias, rows), den};
}

CeRowsFn rows_for(const at::Tensor& x) {
  if (x.device().is_cpu()) return &manual_layers::ce_rows_cpu;
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
  check_class_index_target(op, target, x);
  check_label_smoothing(op, label_smoothing);
  check_class_weight(op, class_weight, x, C);
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
    auto e = [&] { return at::empty({0}, c.o.loss_rows.options()); };
    return {c.o.loss_rows, e(), e(), at::empty({0}, x.options())};
  }
  return {reduce_chunk_losses(c.o.loss_rows, reduction, c.den), c.o.gw, c.o.gb, c.o.gx};
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
  return {need_x ? c.o.gx : e(), need_weight ? c.o.gw.to(dt) : e(),
          need_bias ? c.o.gb.to(dt) : e()};
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
