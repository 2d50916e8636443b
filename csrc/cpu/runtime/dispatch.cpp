// Runtime ISA dispatch of the CPU kernels, the ATen way (aten/src/ATen/native/DispatchStub.h,
// native/cpu/README.md). ISA-NEUTRAL: this file is compiled without any -m flag.
//
// The kernel files csrc/cpu/kernels/*.cpp are compiled once per ISA by setup.py / CMakeLists.txt:
//   DEFAULT  no -m flags (any x86-64; the only copy on other architectures)
//   AVX2     -mavx2 -mfma -mf16c                          (x86-64 only)
//   AVX512   -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma   (x86-64 only; ATen's set)
// each with -DCPU_CAPABILITY=<ISA>, so each copy lives in its own namespace
// manual_layers::<ISA> (and at::vec's inline namespace at::vec::<ISA> keeps the Vectorized
// copies apart). The build tells this file which copies exist (-DML_COMPILED_AVX2,
// -DML_COMPILED_AVX512).
//
// Selection, ONCE, when the library is loaded (the static initialiser of the registration
// below), by the rule of csrc/policy/cpu_isa.cpp: MANUAL_LAYERS_CPU_ISA=default|avx2|avx512 if
// set, else the level ATen runs (at::get_cpu_capability(), which honours
// ATEN_CPU_CAPABILITY=default|avx2|avx512), and in both cases never a level this CPU lacks
// (checked there, not trusted): a refused request warns and falls back to the best level the
// CPU has below it. The op registration then
// points the dispatcher straight at the selected copy's entry functions, so a call costs no
// more than before (one dispatcher call, no extra forwarding layer).
//
// What keeps AVX-512 code unreachable on an AVX2 CPU:
//  - only the selected copy is registered, and the selection checks the CPU itself;
//  - all kernel code of a copy (helpers in anonymous namespaces, entry functions) lives in
//    manual_layers::<ISA> and at::vec::<ISA>: distinct symbols per copy;
//  - inline functions from shared headers (c10, ATen's Tensor methods, csrc/common.h) are
//    emitted as COMDAT/weak copies by every object that uses them, and the linker keeps the
//    FIRST one it sees. The link order is: ISA-neutral objects (this file, ops.cpp), then the
//    DEFAULT copy, then AVX2, then AVX512 (setup.py: extra_objects after the sources;
//    CMakeLists.txt: $<TARGET_OBJECTS> in that order). So a shared inline function is taken
//    from the lowest level that emits it; one emitted only by a per-ISA object is reachable
//    only from that object's (already selected) code. tests/test_isa.py checks the built
//    library: no function outside the AVX2/AVX512 namespaces contains 512-bit instructions.
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <string>

#include "../../contracts/ce_chunked.h"
#include "../../contracts/linear.h"
#include "../../contracts/losses.h"
#include "../../contracts/mlp.h"
#include "../../contracts/sparse.h"
#include "../../policy/cpu_isa.h"

// The per-ISA copies of the entry functions, declared from the ISA-neutral declarations in
// csrc/contracts/linear.h / csrc/contracts/losses.h (decltype keeps them in step with those headers).
#define ML_DECLARE_ISA_KERNELS(ISA)                                            \
  namespace manual_layers::ISA {                                               \
  decltype(manual_layers::linear_fwd_cpu) linear_fwd_cpu;                      \
  decltype(manual_layers::linear_bwd_cpu) linear_bwd_cpu;                      \
  decltype(manual_layers::linear_bce_fwd_cpu) linear_bce_fwd_cpu;              \
  decltype(manual_layers::linear_ce_fwd_cpu) linear_ce_fwd_cpu;                \
  decltype(manual_layers::mlp_bwd_cpu) mlp_bwd_cpu;                            \
  decltype(manual_layers::loss_dx_cpu) loss_dx_cpu;                            \
  decltype(manual_layers::ce_rows_cpu) ce_rows_cpu;                            \
  decltype(manual_layers::ce_soft_rows_cpu) ce_soft_rows_cpu;                  \
  decltype(manual_layers::sparse_linear_loss_fwd_cpu) sparse_linear_loss_fwd_cpu; \
  }
ML_DECLARE_ISA_KERNELS(DEFAULT)
#ifdef ML_COMPILED_AVX2
ML_DECLARE_ISA_KERNELS(AVX2)
#endif
#ifdef ML_COMPILED_AVX512
ML_DECLARE_ISA_KERNELS(AVX512)
#endif

namespace manual_layers {
namespace {

// The entry functions of one compiled copy.
struct CpuKernels {
  decltype(&manual_layers::linear_fwd_cpu) linear_fwd;
  decltype(&manual_layers::linear_bwd_cpu) linear_bwd;
  decltype(&manual_layers::linear_bce_fwd_cpu) linear_bce_fwd;
  decltype(&manual_layers::linear_ce_fwd_cpu) linear_ce_fwd;
  decltype(&manual_layers::mlp_bwd_cpu) mlp_bwd;
  decltype(&manual_layers::loss_dx_cpu) loss_dx;  // called by _linear_loss_bwd (csrc/generic/loss_bwd.cpp)
  decltype(&manual_layers::ce_rows_cpu) ce_rows;  // called by the chunked CE (csrc/generic/ce_chunked.cpp)
  decltype(&manual_layers::ce_soft_rows_cpu) ce_soft_rows;  // and its soft targets (csrc/generic/ce_soft.cpp)
  decltype(&manual_layers::sparse_linear_loss_fwd_cpu) sparse_linear_loss_fwd;  // sparse X fits
};
#define ML_ISA_KERNELS(ISA)                                                               \
  CpuKernels {                                                                            \
    &ISA::linear_fwd_cpu, &ISA::linear_bwd_cpu, &ISA::linear_bce_fwd_cpu,                 \
        &ISA::linear_ce_fwd_cpu, &ISA::mlp_bwd_cpu, &ISA::loss_dx_cpu, &ISA::ce_rows_cpu, \
        &ISA::ce_soft_rows_cpu, &ISA::sparse_linear_loss_fwd_cpu                          \
  }

struct Selected {
  Isa isa;
  CpuKernels kernels;
};

const Selected& selected() {
  static const Selected sel = [] {
    const Isa isa = choose_cpu_isa();
    switch (isa) {
#ifdef ML_COMPILED_AVX512
      case Isa::AVX512: return Selected{isa, ML_ISA_KERNELS(AVX512)};
#endif
#ifdef ML_COMPILED_AVX2
      case Isa::AVX2: return Selected{isa, ML_ISA_KERNELS(AVX2)};
#endif
      default: return Selected{Isa::DEFAULT, ML_ISA_KERNELS(DEFAULT)};
    }
  }();
  return sel;
}

}  // namespace

// The level whose kernels run ("DEFAULT", "AVX2" or "AVX512").
std::string cpu_kernels_isa() { return kIsaNames[static_cast<int>(selected().isa)]; }

// The selected copies of the fused loss kernels, for the C++ fit loop (csrc/fit/logreg_fit.cpp),
// which calls them once per evaluation without the dispatcher.
LossOut linear_bce_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                           const c10::optional<at::Tensor>& pos_weight,
                           const c10::optional<at::Tensor>& sample_weight, int64_t reduction,
                           bool need_x, bool need_weight, bool need_bias) {
  return selected().kernels.linear_bce_fwd(x, weight, bias, target, pos_weight, sample_weight,
                                           reduction, need_x, need_weight, need_bias);
}

LossOut linear_ce_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                          const c10::optional<at::Tensor>& class_weight, int64_t ignore_index,
                          double label_smoothing, int64_t reduction, bool need_x,
                          bool need_weight, bool need_bias) {
  return selected().kernels.linear_ce_fwd(x, weight, bias, target, class_weight, ignore_index,
                                          label_smoothing, reduction, need_x, need_weight,
                                          need_bias);
}

// The selected copy of the small-C dX kernel (csrc/generic/loss_bwd.cpp).
at::Tensor loss_dx_cpu(const at::Tensor& residual, const at::Tensor& coef,
                       const at::Tensor& weight) {
  return selected().kernels.loss_dx(residual, coef, weight);
}

// The selected copy of the chunked cross entropy's row pass (csrc/generic/ce_chunked.cpp).
void ce_rows_cpu(at::Tensor& logits, const at::Tensor& bias, const at::Tensor& target,
                 const at::Tensor& class_weight, const at::Tensor& aux, const at::Tensor& row_scale,
                 at::Tensor& loss_rows, int64_t ignore_index, double label_smoothing,
                 bool write_residual, at::Tensor* bias_grad) {
  selected().kernels.ce_rows(logits, bias, target, class_weight, aux, row_scale, loss_rows,
                             ignore_index, label_smoothing, write_residual, bias_grad);
}

// The selected copy of the probability-target row pass (csrc/generic/ce_soft.cpp).
void ce_soft_rows_cpu(at::Tensor& logits, const at::Tensor& bias, const at::Tensor& target,
                      const at::Tensor& class_weight, double scale, const at::Tensor& row_scale,
                      at::Tensor& loss_rows, double label_smoothing, bool write_residual,
                      at::Tensor* bias_grad) {
  selected().kernels.ce_soft_rows(logits, bias, target, class_weight, scale, row_scale, loss_rows,
                                  label_smoothing, write_residual, bias_grad);
}

}  // namespace manual_layers

// The CPU kernels: the selected copy's entry functions, chosen here at load.
TORCH_LIBRARY_IMPL(manual_layers, CPU, m) {
  const manual_layers::CpuKernels& k = manual_layers::selected().kernels;
  m.impl("_linear_fwd", k.linear_fwd);
  m.impl("_linear_bwd", k.linear_bwd);
  m.impl("_linear_bce_fwd", k.linear_bce_fwd);
  m.impl("_linear_ce_fwd", k.linear_ce_fwd);
  m.impl("_mlp_bwd", k.mlp_bwd);
  m.impl("_sparse_linear_loss_fwd", k.sparse_linear_loss_fwd);
}

// Which copy runs, for manual_layers.info() (no tensors: a catch-all kernel, not traced).
// The compiled list is in _C.build_info()["cpu_isa"].
TORCH_LIBRARY_FRAGMENT(manual_layers, m) {
  m.def("_cpu_kernels_isa() -> str", [] { return manual_layers::cpu_kernels_isa(); });
}
