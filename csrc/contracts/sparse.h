// Fused logistic-regression loss and gradient on a CSR matrix X (sparse features: bag-of-words,
// TF-IDF, hashed and one-hot columns): the private op _sparse_linear_loss_fwd (schema in
// csrc/ops.cpp). CPU kernel: csrc/cpu/kernels/sparse.cpp (compiled per ISA, selected in
// csrc/cpu/runtime/dispatch.cpp). CUDA: a device-generic composite of ATen's sparse CSR ops, in Python
// (manual_layers/_sparse.py, _composite), registered for the CUDA key; not a fused kernel.
//
// X (N, D) is given by its three CSR arrays: crow_indices (N + 1,) int32 or int64,
// non-decreasing; col_indices (nnz,) int32 or int64, each in [0, D); values (nnz,) floating.
// Rows i hold the entries crow[i] .. crow[i + 1] of col_indices / values; column indices need
// not be sorted and may repeat: X_ij is the SUM of a row's entries with column j (as scipy
// defines a non-canonical CSR matrix), which the loss and gradient are linear in, so duplicates
// need no canonicalisation. weight (C, D) has values' dtype; D = weight.size(1).
//
//   z_i = x_i W^T + b,  s_i = sample_weight_i (1 when None)
//   binary (target floating, (N,) in [0, 1], C == 1):
//     loss_i = s_i [(1 - y_i) z_i + softplus(-z_i)],          r_i = s_i (sigmoid(z_i) - y_i)
//   multinomial (target int64 class indices (N,) in [0, C)):
//     loss_i = s_i (logsumexp(z_i) - z_{i, y_i}),             r_i = s_i (softmax(z_i) - e_{y_i})
//
// Returns (loss, grad_weight, grad_bias), reduction "sum" of csrc/contracts/losses.h's LossOut contract
// (there is no residual: a sparse X gets no gradient): loss = sum_i loss_i, a 0-d acc_t tensor;
// grad_weight = r^T X (C, D) acc_t when need_weight, grad_bias = sum_i r_i (C,) acc_t when
// need_bias, else empty (0,) tensors. acc_t is double for double values and float otherwise
// (16-bit values are widened to float once, a copy of the values); the per-row losses are
// summed in double.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace manual_layers {

using SparseLossOut = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

SparseLossOut sparse_linear_loss_fwd_cpu(const at::Tensor& crow_indices,
                                         const at::Tensor& col_indices, const at::Tensor& values,
                                         const at::Tensor& weight,
                                         const c10::optional<at::Tensor>& bias,
                                         const at::Tensor& target,
                                         const c10::optional<at::Tensor>& sample_weight,
                                         bool need_weight, bool need_bias);

}  // namespace manual_layers
