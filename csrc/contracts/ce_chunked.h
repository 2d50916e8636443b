// The chunked linear + cross entropy's shared pieces: the device-generic chunk driver
// (csrc/generic/ce_chunked.cpp), used by the class-index ops (_linear_ce_chunked_*, csrc/generic/ce_chunked.cpp)
// and the probability-target ops (_linear_ce_soft_*, csrc/generic/ce_soft.cpp), and the row passes of the
// probability targets. The ops' contracts are at the top of csrc/generic/ce_chunked.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/FunctionRef.h>
#include <c10/util/Optional.h>

#include <cstdint>

namespace manual_layers {

// What the driver returns: loss_rows (N,) acc_t, the unscaled per-row losses; gx (N, D) x's dtype,
// gw (C, D) acc_t, gb (C,) acc_t, each an empty (0,) tensor when not computed.
struct ChunkedOut {
  at::Tensor loss_rows, gx, gw, gb;
};

// The row pass of one chunk, rows [row0, row0 + r) of the batch: logits (r, C) (x W^T, no bias,
// in the driver's logits dtype: x's, or fp32 for a widened fp16 x), contiguous; row_scale (r,)
// acc_t grad_loss rows or undefined; loss_rows (r,) acc_t, written. When write_residual it writes
// dloss_i/dlogits_i (times the scale) over the logits and, when bias_grad is not null, adds the
// acc_t residual's column sums to it.
using ChunkRows = c10::function_ref<void(at::Tensor& logits, int64_t row0,
                                         const at::Tensor& row_scale, at::Tensor& loss_rows,
                                         bool write_residual, at::Tensor* bias_grad)>;

// The chunk loop: per chunk of R rows (R x C logits <= kCeChunkBytes, or
// MANUAL_LAYERS_CE_CHUNK_ROWS), logits = x_c W^T, the row pass, then dX_c = residual W (into
// rows of gx), gw += residual^T x_c, gb by the row pass. grad_rows defined: the backward of
// reduction none (the row pass gets each chunk's rows of it as row_scale). Residuals are
// written when reduction is mean/sum, or grad_rows is defined, and some need_* flag is set.
ChunkedOut run_chunks(const at::Tensor& x, const at::Tensor& weight, int64_t reduction,
                      const at::Tensor& grad_rows, bool need_x, bool need_weight, bool need_bias,
                      ChunkRows rows);

// The forward op's loss of reduction mean/sum: loss_rows summed in double in a fixed order, / den
// for mean (den a 0-d tensor on the device; NaN when den == 0, as torch), as a 0-d acc_t tensor.
at::Tensor reduce_chunk_losses(const at::Tensor& loss_rows, int64_t reduction,
                               const at::Tensor& den);

// The error of a CPU-only build given CUDA tensors.
[[noreturn]] void ce_no_cuda_build();

// The row passes of probability targets (F.cross_entropy(z, q, weight=w, label_smoothing=eps)):
// per row i of the chunk, z_i = logits_i + bias, q'_i = (1 - eps) q_i + eps / C, w = class_weight
// (ones if undefined):
//   loss_i = -sum_c w_c q'_ic log softmax(z_i)_c = log(s_i) S_i + sum_c w_c q'_ic (m_i - z_ic)
//   (m_i = max z_i, s_i = sum exp(z_i - m_i), S_i = sum_c w_c q'_ic)
//   residual_ic = coef_i (S_i softmax(z_i)_c - w_c q'_ic),  coef_i = scale * row_scale_i
// target (r, C): any real values (not only probabilities). bias, class_weight (C,) acc_t or
// undefined; scale: 1/N for mean, 1 otherwise; the other arguments as ChunkRows.
//
// ce_soft_rows_cpu: the CPU kernel (csrc/cpu/kernels/ce_rows.cpp, compiled per ISA, selected by
// csrc/cpu/runtime/dispatch.cpp): target contiguous, in acc_t or in the logits' dtype; the bias gradient
// summed per fixed block of rows, the blocks added in order (bitwise the same for any thread
// count).
void ce_soft_rows_cpu(at::Tensor& logits, const at::Tensor& bias, const at::Tensor& target,
                      const at::Tensor& class_weight, double scale, const at::Tensor& row_scale,
                      at::Tensor& loss_rows, double label_smoothing, bool write_residual,
                      at::Tensor* bias_grad);
// ce_soft_rows_aten: the same from ATen ops (log_softmax, sums), on any device, any float target
// dtype: the CUDA row pass of probability targets until a CUDA kernel can be run and measured
// (csrc/generic/ce_soft.cpp; MANUAL_LAYERS_CE_SOFT_ROWS=aten runs it on CPU tensors too).
void ce_soft_rows_aten(at::Tensor& logits, const at::Tensor& bias, const at::Tensor& target,
                       const at::Tensor& class_weight, double scale, const at::Tensor& row_scale,
                       at::Tensor& loss_rows, double label_smoothing, bool write_residual,
                       at::Tensor* bias_grad);

}  // namespace manual_layers
