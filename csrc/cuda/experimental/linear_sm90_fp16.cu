// The sm_90 CUTLASS kernels of csrc/cuda/experimental/linear_sm90.h, fp16 instances: Linear + GELU
// / SiLU, the MLP backward's dgrad. Empty unless setup.py found CUTLASS and compiles for sm_90a.
#ifndef NDEBUG
#define NDEBUG  // CUTLASS's device asserts are calls that serialize the wgmma pipeline
#endif
#include "linear_sm90.cuh"

#ifdef ML_WITH_CUTLASS_SM90
ML_SM90_DEFINE(fp16, cutlass::half_t)
#endif
