// The MLP backward's dgrad with the activation and bias gradients in its epilogue, one sm_90
// CUTLASS kernel, bf16 instances (csrc/cuda/linear_sm90.h: mlp_dgrad_act).
// Empty unless setup.py found CUTLASS and compiles for sm_90a (ML_WITH_CUTLASS_SM90).
#ifndef NDEBUG
#define NDEBUG  // CUTLASS's device asserts are calls that serialize the wgmma pipeline
#endif
#include "linear_sm90.cuh"

#ifdef ML_WITH_CUTLASS_SM90
namespace manual_layers {
namespace sm90 {

bool mlp_dgrad_act_bf16(Act act, const void* g, const void* w2, const void* saved, void* G,
                        void* db, int64_t rows, int64_t hidden, int64_t out, int device,
                        int sm_count, cudaStream_t stream) {
  return detail::mlp_dgrad_act_typed<cutlass::bfloat16_t>(act, g, w2, saved, G, db, rows, hidden, out,
                                                  device, sm_count, stream);
}

}  // namespace sm90
}  // namespace manual_layers
#endif  // ML_WITH_CUTLASS_SM90
