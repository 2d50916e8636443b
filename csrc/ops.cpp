// Every schema of the manual_layers ops, in one place, and the pybind11 module _C that
// carries the build information. Kernels register themselves per device in
// csrc/cpu/kernels/*.cpp (CPU) and csrc/cuda/**/*.cu (CUDA); fake kernels live in manual_layers/_ops.py.
#include <torch/library.h>
#ifndef ML_NO_PYTHON
#include <torch/extension.h>
#endif

#include "contracts/linear.h"
#include "contracts/losses.h"

// What the build chose and why (setup.py writes it; the CMake build has none).
#if __has_include("ml_build_config.h")
#include "ml_build_config.h"
#endif
#ifndef ML_BUILD_CUDA_WHY
#define ML_BUILD_CUDA_WHY ""
#endif
#ifndef ML_BUILD_EXPERIMENTAL_WHY
#define ML_BUILD_EXPERIMENTAL_WHY ""
#endif
#ifndef ML_TORCH_VERSION
#define ML_TORCH_VERSION "unknown"
#endif
#ifndef ML_CPU_ISA
#define ML_CPU_ISA "DEFAULT"
#endif
#ifndef ML_CUDA_ARCHS
#define ML_CUDA_ARCHS ""
#endif

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

#ifndef WITH_CUDA
// A build without CUDA kernels: a CUDA tensor gets an error that says so and how to rebuild,
// instead of the dispatcher's generic "could not run ... with arguments from the CUDA backend".
// (_linear_loss_bwd is device-generic ATen code, registered for CUDA in csrc/generic/loss_bwd.cpp.)
namespace {
[[noreturn]] void no_cuda_build() {
  TORCH_CHECK(false,
              "manual_layers was built without its CUDA kernels (CPU-only build), so it cannot "
              "run on CUDA tensors. Rebuild with a CUDA build of torch and nvcc available: "
              "MANUAL_LAYERS_CUDA=1 pip install --no-build-isolation -e .  "
              "(`python -m manual_layers info` shows the current build)");
}
}  // namespace

TORCH_LIBRARY_IMPL(manual_layers, CUDA, m) {
  m.impl("_linear_fwd", [](const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                           c10::string_view, bool) -> std::tuple<at::Tensor, at::Tensor> {
    no_cuda_build();
  });
  m.impl("_linear_bwd",
         [](const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
            c10::string_view, bool, bool, bool) -> std::tuple<at::Tensor, at::Tensor, at::Tensor> {
           no_cuda_build();
         });
  m.impl("_linear_bce_fwd",
         [](const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
            const at::Tensor&, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
            int64_t, bool, bool, bool) -> manual_layers::LossOut { no_cuda_build(); });
  m.impl("_linear_ce_fwd",
         [](const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
            const at::Tensor&, const c10::optional<at::Tensor>&, int64_t, double, int64_t, bool,
            bool, bool) -> manual_layers::LossOut { no_cuda_build(); });
}
#endif

#ifndef ML_NO_PYTHON  // the C++ test (tests/cpp/) links the ops without Python
PYBIND11_MODULE(_C, m) {
  m.doc() = "manual_layers C++/CUDA kernels (ops are registered under torch.ops.manual_layers)";
  m.def("build_info", []() {
    pybind11::dict d;
    d["torch_version"] = ML_TORCH_VERSION;
    d["cpu_isa"] = ML_CPU_ISA;
    d["cuda_why"] = ML_BUILD_CUDA_WHY;
    d["experimental_why"] = ML_BUILD_EXPERIMENTAL_WHY;
#ifdef ML_BUILT_SM90A
    d["ce_cluster_sm90a"] = true;  // the cross-entropy cluster instances (experimental)
#else
    d["ce_cluster_sm90a"] = false;
#endif
#ifdef WITH_CUDA
    d["cuda_compiled"] = true;
    d["cuda_archs"] = ML_CUDA_ARCHS;
#ifdef ML_WITH_CUTLASS_SM90
    d["cutlass_sm90"] = true;  // csrc/cuda/experimental/linear_sm90.h
#else
    d["cutlass_sm90"] = false;
#endif
#else
    d["cuda_compiled"] = false;
    d["cuda_archs"] = "";
    d["cutlass_sm90"] = false;
#endif
    return d;
  });
}
#endif
