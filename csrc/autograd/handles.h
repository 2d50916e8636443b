// Typed dispatcher handles of the ops the Autograd kernels call (schemas: csrc/ops.cpp).
#pragma once

#include "../contracts/losses.h"
#include "../contracts/mlp.h"
#include "common.h"

namespace manual_layers {

using LinearFwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                        const c10::optional<at::Tensor>&,
                                                        c10::string_view, bool);
using LinearBwdSig = Grads3(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, c10::string_view, bool, bool, bool);
using LinearGraphSig = Grads3(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const c10::optional<at::Tensor>&, c10::string_view, bool, bool,
                              bool);
using LinearSig = at::Tensor(const at::Tensor&, const at::Tensor&,
                             const c10::optional<at::Tensor>&, c10::string_view);
ML_OP_HANDLE(linear_fwd_op, "_linear_fwd", LinearFwdSig)
ML_OP_HANDLE(linear_bwd_op, "_linear_bwd", LinearBwdSig)
ML_OP_HANDLE(linear_graph_op, "_linear_backward_graph", LinearGraphSig)
ML_OP_HANDLE(linear_op, "linear", LinearSig)

using MlpBwdSig = MlpGrads(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           c10::string_view, bool, bool, bool, bool, bool);
using MlpGraphSig = MlpGrads(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const c10::optional<at::Tensor>&, const at::Tensor&,
                             const c10::optional<at::Tensor>&, c10::string_view, bool, bool,
                             bool, bool, bool);
using MlpSig = at::Tensor(const at::Tensor&, const at::Tensor&,
                          const c10::optional<at::Tensor>&, const at::Tensor&,
                          const c10::optional<at::Tensor>&, c10::string_view);
ML_OP_HANDLE(mlp_bwd_op, "_mlp_bwd", MlpBwdSig)
ML_OP_HANDLE(mlp_graph_op, "_mlp_backward_graph", MlpGraphSig)
ML_OP_HANDLE(mlp_op, "mlp", MlpSig)

using OptT = c10::optional<at::Tensor>;
using BceFwdSig = LossOut(const at::Tensor&, const at::Tensor&, const OptT&, const at::Tensor&,
                          const OptT&, const OptT&, int64_t, bool, bool, bool);
using CeFwdSig = LossOut(const at::Tensor&, const at::Tensor&, const OptT&, const at::Tensor&,
                         const OptT&, int64_t, double, int64_t, bool, bool, bool);
using LossBwdSig = Grads3(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, bool,
                          bool, bool);
using CeChunkedBwdSig = Grads3(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const OptT&, const at::Tensor&, const OptT&, int64_t, double,
                               bool, bool, bool);
using BceGraphSig = Grads3(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const OptT&, const at::Tensor&, const OptT&, const OptT&, int64_t,
                           bool, bool, bool);
using CeGraphSig = Grads3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&,
                          const at::Tensor&, const OptT&, int64_t, double, int64_t, bool, bool,
                          bool);
using BceSig = at::Tensor(const at::Tensor&, const at::Tensor&, const OptT&, const at::Tensor&,
                          const OptT&, const OptT&, int64_t, c10::optional<at::ScalarType>);
using CeSig = at::Tensor(const at::Tensor&, const at::Tensor&, const OptT&, const at::Tensor&,
                         const OptT&, int64_t, double, int64_t, c10::optional<at::ScalarType>);
ML_OP_HANDLE(bce_fwd_op, "_linear_bce_fwd", BceFwdSig)
ML_OP_HANDLE(ce_fwd_op, "_linear_ce_fwd", CeFwdSig)
ML_OP_HANDLE(loss_bwd_op, "_linear_loss_bwd", LossBwdSig)
ML_OP_HANDLE(ce_chunked_fwd_op, "_linear_ce_chunked_fwd", CeFwdSig)
ML_OP_HANDLE(ce_chunked_bwd_op, "_linear_ce_chunked_bwd", CeChunkedBwdSig)
ML_OP_HANDLE(bce_graph_op, "_linear_bce_backward_graph", BceGraphSig)
ML_OP_HANDLE(ce_graph_op, "_linear_ce_backward_graph", CeGraphSig)
using CeSoftFwdSig = LossOut(const at::Tensor&, const at::Tensor&, const OptT&, const at::Tensor&,
                             const OptT&, double, int64_t, bool, bool, bool);
using CeSoftBwdSig = Grads3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&,
                            const at::Tensor&, const OptT&, double, bool, bool, bool);
ML_OP_HANDLE(ce_soft_fwd_op, "_linear_ce_soft_fwd", CeSoftFwdSig)
ML_OP_HANDLE(ce_soft_bwd_op, "_linear_ce_soft_bwd", CeSoftBwdSig)
ML_OP_HANDLE(bce_op, "linear_bce", BceSig)
ML_OP_HANDLE(ce_op, "linear_ce", CeSig)

}  // namespace manual_layers
