// Linear's forward with GELU (erf) or SiLU inside the GEMM's epilogue, on sm_90 (H100 / H200):
// one CUTLASS 3 kernel (TMA loads, wgmma, warp-specialized persistent cooperative schedule)
// computes z = x W^T + b in fp32, writes out = act(z) and, for training, the pre-activation z
// (the tensor backward reads), both rounded once to x's dtype. cuBLASLt has no such epilogue
// for exact GELU or SiLU (only the tanh approximation), so without this kernel the activation
// is a second pass over the (N, M) output (csrc/cuda/linear/linear.cu).
//
// Built only when setup.py finds CUTLASS's headers (the nvidia-cutlass wheel, or CUTLASS_PATH)
// and compiles for sm_90a (TORCH_CUDA_ARCH_LIST 9.0 becomes 9.0a); it then defines
// ML_WITH_CUTLASS_SM90. Used only when MANUAL_LAYERS_CUTLASS=1 (opt-in until it has been
// measured on an H100/H200: it compiles in CI, but no GPU has run it yet).
#pragma once

#include <c10/core/ScalarType.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "../../common.h"

namespace manual_layers {

// MANUAL_LAYERS_CUTLASS=1 turns on the sm_90 CUTLASS kernels declared here: Linear + GELU / SiLU
// (csrc/cuda/linear/linear.cu), the MLP backward's fused dgrad (csrc/cuda/linear/mlp_dgrad.cu).
// Opt-in until they have been measured on an H100 / H200. Read on every call, like the other
// path switches.
inline bool sm90_cutlass_enabled() {
  const char* v = std::getenv("MANUAL_LAYERS_CUTLASS");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

namespace sm90 {

// out (rows, features) = act(x (rows, in) . w (features, in)^T + bias); pre (same shape) = the
// pre-activation when pre != nullptr. All row-major and contiguous; bias may be nullptr. Returns
// false, having launched nothing, when the problem is outside the kernel's range (dtype other than
// bf16 / fp16, activation other than gelu / silu, a row stride or pointer that is not 16-byte
// aligned, a dimension of 2^31 or more, or CUTLASS's own can_implement); the caller then takes the
// cuBLASLt path. Throws when a launch fails. (linear_act_fwd below; these two are its per-dtype
// halves, csrc/cuda/experimental/linear_sm90_bf16.cu and linear_sm90_fp16.cu.)
bool linear_act_fwd_bf16(Act act, const void* x, const void* w, const void* bias, void* out,
                         void* pre, int64_t rows, int64_t features, int64_t in_features,
                         int device, int sm_count, cudaStream_t stream);
bool linear_act_fwd_fp16(Act act, const void* x, const void* w, const void* bias, void* out,
                         void* pre, int64_t rows, int64_t features, int64_t in_features,
                         int device, int sm_count, cudaStream_t stream);

// The MLP backward's middle step (csrc/generic/mlp_bwd.cpp) in one kernel: G (rows, hidden) =
// (g (rows, out) . w2 (out, hidden)) * act'(saved) and, when db != nullptr, db (hidden,) = the
// column sums of G (summed in fp32 before G is rounded; per-tile partials added in a fixed
// order: deterministic). saved is what csrc/common.h saved_for names (the pre-activation for
// gelu / gelu_tanh / silu, the output for relu), (rows, hidden) like G. The second layer's
// dgrad GEMM, computed transposed (G^T = w2^T . g^T) so that the bias gradient is CUTLASS's
// per-row reduction. Activations gelu, gelu_tanh, silu, relu; same contract as linear_act_fwd
// otherwise (false: nothing launched, the caller composes _linear_bwd instead).
bool mlp_dgrad_act_bf16(Act act, const void* g, const void* w2, const void* saved, void* G,
                        void* db, int64_t rows, int64_t hidden, int64_t out, int device,
                        int sm_count, cudaStream_t stream);
bool mlp_dgrad_act_fp16(Act act, const void* g, const void* w2, const void* saved, void* G,
                        void* db, int64_t rows, int64_t hidden, int64_t out, int device,
                        int sm_count, cudaStream_t stream);

inline bool mlp_dgrad_act(c10::ScalarType dtype, Act act, const void* g, const void* w2,
                          const void* saved, void* G, void* db, int64_t rows, int64_t hidden,
                          int64_t out, int device, int sm_count, cudaStream_t stream) {
#ifdef ML_WITH_CUTLASS_SM90
  if (dtype == c10::ScalarType::BFloat16) {
    return mlp_dgrad_act_bf16(act, g, w2, saved, G, db, rows, hidden, out, device, sm_count,
                              stream);
  }
  if (dtype == c10::ScalarType::Half) {
    return mlp_dgrad_act_fp16(act, g, w2, saved, G, db, rows, hidden, out, device, sm_count,
                              stream);
  }
#else
  (void)dtype, (void)act, (void)g, (void)w2, (void)saved, (void)G, (void)db, (void)rows;
  (void)hidden, (void)out, (void)device, (void)sm_count, (void)stream;
#endif
  return false;
}

inline bool linear_act_fwd(c10::ScalarType dtype, Act act, const void* x, const void* w,
                           const void* bias, void* out, void* pre, int64_t rows,
                           int64_t features, int64_t in_features, int device, int sm_count,
                           cudaStream_t stream) {
#ifdef ML_WITH_CUTLASS_SM90
  if (dtype == c10::ScalarType::BFloat16) {
    return linear_act_fwd_bf16(act, x, w, bias, out, pre, rows, features, in_features, device,
                               sm_count, stream);
  }
  if (dtype == c10::ScalarType::Half) {
    return linear_act_fwd_fp16(act, x, w, bias, out, pre, rows, features, in_features, device,
                               sm_count, stream);
  }
#else
  (void)dtype, (void)act, (void)x, (void)w, (void)bias, (void)out, (void)pre, (void)rows;
  (void)features, (void)in_features, (void)device, (void)sm_count, (void)stream;
#endif
  return false;
}

}  // namespace sm90
}  // namespace manual_layers
