// Every schema of the manual_layers ops, in one place. Each kernel registers its own dispatch key
// in its own file: Autograd / Autocast in csrc/autograd/, CPU in csrc/cpu/runtime/dispatch.cpp
// (the selected ISA copy of csrc/cpu/kernels/), CUDA in csrc/cuda/linear/ and csrc/cuda/losses/,
// device-generic compositions in csrc/generic/; fake kernels live in manual_layers/_ops.py. The
// pybind11 module _C with the build information is csrc/module.cpp.
#include <torch/library.h>

#include "contracts/linear.h"
#include "contracts/losses.h"

TORCH_LIBRARY(manual_layers, m) {
  // Public ops: what manual_layers.functional calls and what torch.compile / torch.export
  // graphs contain. Each has an Autograd, a CPU, a CUDA and two Autocast kernels
  // (csrc/autograd/*.cpp, one file per op family; csrc/autograd/common.h says what each does).
  // x: (..., in_features), any leading dims; the losses' target: x.shape[:-1]. The losses' dtype:
  // the dtype of the returned loss (default x's; autocast asks for float32).
  m.def("linear(Tensor x, Tensor weight, Tensor? bias=None, str activation=\"none\") -> Tensor");
  m.def("linear_bce(Tensor x, Tensor weight, Tensor? bias, Tensor target, Tensor? pos_weight=None,"
        " Tensor? sample_weight=None, int reduction=1, ScalarType? dtype=None) -> Tensor");
  // MLP: Linear -> activation -> Linear (w1 (H, K), w2 (O, H)); backward is one _mlp_bwd.
  m.def("mlp(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, str activation=\"gelu\")"
        " -> Tensor");
  m.def("linear_ce(Tensor x, Tensor weight, Tensor? bias, Tensor target, Tensor? class_weight=None,"
        " int ignore_index=-100, float label_smoothing=0.0, int reduction=1,"
        " ScalarType? dtype=None) -> Tensor");

  // The derivatives in differentiable PyTorch ops (CompositeImplicitAutograd kernels in
  // manual_layers/_derivatives.py): what the Autograd kernels' backward calls when a graph of
  // the backward is wanted (double backward). 2-D x; not-needed gradients come back empty.
  m.def("_linear_backward_graph(Tensor grad, Tensor x, Tensor weight, Tensor? bias,"
        " str activation, bool need_x, bool need_weight, bool need_bias)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("_mlp_backward_graph(Tensor grad, Tensor x, Tensor w1, Tensor? b1, Tensor w2,"
        " Tensor? b2, str activation, bool need_x, bool need_w1, bool need_b1, bool need_w2,"
        " bool need_b2) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("_linear_bce_backward_graph(Tensor grad, Tensor x, Tensor weight, Tensor? bias,"
        " Tensor target, Tensor? pos_weight, Tensor? sample_weight, int reduction, bool need_x,"
        " bool need_weight, bool need_bias) -> (Tensor, Tensor, Tensor)");
  m.def("_linear_ce_backward_graph(Tensor grad, Tensor x, Tensor weight, Tensor? bias,"
        " Tensor target, Tensor? class_weight, int ignore_index, float label_smoothing,"
        " int reduction, bool need_x, bool need_weight, bool need_bias)"
        " -> (Tensor, Tensor, Tensor)");

  // Private kernel ops (CPU: csrc/cpu/kernels/*.cpp, CUDA: csrc/cuda/**/*.cu); 2-D x. Contracts in
  // csrc/contracts/linear.h and csrc/contracts/losses.h.
  m.def("_linear_fwd(Tensor x, Tensor weight, Tensor? bias, str activation, bool save_pre)"
        " -> (Tensor, Tensor)");
  m.def("_linear_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor saved, str activation,"
        " bool need_x, bool need_weight, bool need_bias) -> (Tensor, Tensor, Tensor)");
  m.def("_linear_bce_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor target,"
        " Tensor? pos_weight, Tensor? sample_weight, int reduction, bool need_x,"
        " bool need_weight, bool need_bias) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("_linear_ce_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor target,"
        " Tensor? class_weight, int ignore_index, float label_smoothing, int reduction,"
        " bool need_x, bool need_weight, bool need_bias) -> (Tensor, Tensor, Tensor, Tensor)");
  // Sparse X in CSR form (csrc/contracts/sparse.h is the contract): loss and gradients, reduction
  // sum; CPU: csrc/cpu/kernels/sparse.cpp; CUDA: an ATen composite (manual_layers/_sparse.py).
  m.def("_sparse_linear_loss_fwd(Tensor crow_indices, Tensor col_indices, Tensor values,"
        " Tensor weight, Tensor? bias, Tensor target, Tensor? sample_weight, bool need_weight,"
        " bool need_bias) -> (Tensor, Tensor, Tensor)");
  // A whole logistic-regression fit on dense X (CPU only: csrc/fit/logreg_fit.cpp), the L-BFGS
  // (or, with an L1 weight, OWL-QN) loop in C++ around the fused kernels above; returns
  // (params, info).
  m.def("_logreg_fit(Tensor x, Tensor target, Tensor? sample_weight, Tensor? class_weight,"
        " int n_classes, bool fit_intercept, float weight_sum, float l2_inv_c, float l1_weight,"
        " Tensor x0, int max_iter, float tol) -> (Tensor, Tensor)");
  m.def("_linear_loss_bwd(Tensor grad_loss, Tensor residual, Tensor x, Tensor weight,"
        " Tensor grad_weight, Tensor grad_bias, int reduction, bool need_x, bool need_weight,"
        " bool need_bias) -> (Tensor, Tensor, Tensor)");
  m.def("_mlp_bwd(Tensor grad_out, Tensor x, Tensor w1, Tensor w2, Tensor h, Tensor saved,"
        " str activation, bool need_x, bool need_w1, bool need_b1, bool need_w2, bool need_b2)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Chunked linear + cross entropy for large C (csrc/generic/ce_chunked.cpp is the contract):
  // mean/sum return (loss, grad_weight, grad_bias, grad_x) for grad_output 1; none returns the
  // per-row losses only and its backward recomputes the logits chunk by chunk.
  m.def("_linear_ce_chunked_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor target,"
        " Tensor? class_weight, int ignore_index, float label_smoothing, int reduction,"
        " bool need_x, bool need_weight, bool need_bias) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("_linear_ce_chunked_bwd(Tensor grad_loss, Tensor x, Tensor weight, Tensor? bias,"
        " Tensor target, Tensor? class_weight, int ignore_index, float label_smoothing,"
        " bool need_x, bool need_weight, bool need_bias) -> (Tensor, Tensor, Tensor)");
  // The same with probability targets (N, C) (csrc/generic/ce_soft.cpp; contract in csrc/generic/ce_chunked.cpp).
  m.def("_linear_ce_soft_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor target,"
        " Tensor? class_weight, float label_smoothing, int reduction, bool need_x,"
        " bool need_weight, bool need_bias) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("_linear_ce_soft_bwd(Tensor grad_loss, Tensor x, Tensor weight, Tensor? bias,"
        " Tensor target, Tensor? class_weight, float label_smoothing, bool need_x,"
        " bool need_weight, bool need_bias) -> (Tensor, Tensor, Tensor)");
}
