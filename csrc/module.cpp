// The pybind11 module _C (the build information: what was built and why), and, in a build
// without CUDA kernels, the CUDA key's error for the CUDA kernels that are missing.
#include <torch/library.h>
#ifndef ML_NO_PYTHON
#include <pybind11/pybind11.h>  // only the module and a dict: torch/extension.h costs half a minute
#endif

#include "contracts/linear.h"
#include "contracts/losses.h"
#include "cpu/runtime/tile_calibration.h"

// What the build chose and why (setup.py writes it; the CMake build has none).
#if __has_include("ml_build_config.h")
#include "ml_build_config.h"
#endif
#ifndef ML_BUILD_CUDA_WHY
#define ML_BUILD_CUDA_WHY ""
#endif
#ifndef ML_BUILD_CPU_ISA_WHY
#define ML_BUILD_CPU_ISA_WHY ""
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
    d["cpu_isa_why"] = ML_BUILD_CPU_ISA_WHY;
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
  // The CPU binary loss pass's tile calibration (csrc/cpu/runtime/tile_calibration.h): its
  // state as text, and a reset (tests).
  m.def("cpu_tile_calibration", []() { return manual_layers::tile_calibration::describe(); });
  m.def("cpu_tile_calibration_reset", []() { manual_layers::tile_calibration::reset(); });
}
#endif
