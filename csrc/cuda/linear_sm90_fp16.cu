// Linear + GELU / SiLU in one sm_90 CUTLASS kernel, fp16 instances (csrc/cuda/linear_sm90.h).
// Empty unless setup.py found CUTLASS and compiles for sm_90a (ML_WITH_CUTLASS_SM90).
#ifndef NDEBUG
#define NDEBUG  // CUTLASS's device asserts are calls that serialize the wgmma pipeline
#endif
#include "linear_sm90.cuh"

#ifdef ML_WITH_CUTLASS_SM90
namespace manual_layers {
namespace sm90 {

bool linear_act_fwd_fp16(Act act, const void* x, const void* w, const void* bias, void* out,
                         void* pre, int64_t rows, int64_t features, int64_t in_features,
                         int device, int sm_count, cudaStream_t stream) {
  return detail::linear_act_fwd_typed<cutlass::half_t>(act, x, w, bias, out, pre, rows, features,
                                                        in_features, device, sm_count, stream);
}

}  // namespace sm90
}  // namespace manual_layers
#endif  // ML_WITH_CUTLASS_SM90
