// Small CUDA helpers shared by the manual_layers .cu files (csrc/cuda/linear/, csrc/cuda/losses/).
//
// Contents:
//   1. launch and host helpers: kThreads, ceil_div, num_sms, grid sizes for grid-stride loops
//      (int64 indexing), 16-byte alignment tests, aligned_contiguous(), acc_type_of, empty0,
//      opt_data;
//   2. AlignedVec<T, VEC> for 16-byte vector loads/stores;
//   3. warp reductions (sum, max) over all 32 lanes, and over aligned groups of G lanes;
//   4. activation functions act_forward<A>(z) and act_backward<A>(g, saved) in the op-math
//      type (float for half/bfloat16/float, double for double), with the exact formulas of
//      torch's nn.ReLU / nn.GELU() / nn.GELU("tanh") / nn.SiLU / nn.Sigmoid / nn.Tanh;
// The cuBLASLt matmul wrapper (lt_matmul and its plan cache) is csrc/cuda/common/cublaslt.cuh,
// included only by the files that call cuBLASLt.
//
// Everything is header-only (inline or templates) so that several .cu files can include it.
#pragma once

#include <ATen/Context.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "../../common.h"

// A kernel's dynamic shared memory, as a byte array `name` (the host emulation of tests/cuda_emu
// defines its own).
#ifndef ML_DYNAMIC_SMEM
#define ML_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace manual_layers {
namespace cuda_common {

// ---------------------------------------------------------------------------------------------
// 1. Launch helpers
// ---------------------------------------------------------------------------------------------

constexpr int kThreads = 256;  // threads per block of the elementwise kernels (a multiple of 32)

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Streaming multiprocessors of the current device.
inline int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// Blocks for a grid-stride loop over `items` work items with `threads` items per block (a
// thread each, or e.g. a warp each for row kernels: grid_for(rows, warps per block)): enough to
// fill the device (8 blocks per SM) and never more than needed, at least 1.
// The loops index with int64, so any n is covered, and gridDim.x stays far below 2^31 - 1.
inline int64_t grid_for(int64_t items, int threads = kThreads) {
  const int64_t sms = num_sms();
  int64_t blocks = ceil_div(items, threads);
  const int64_t cap = sms * 8;
  if (blocks > cap) blocks = cap;
  if (blocks < 1) blocks = 1;
  return blocks;
}

inline bool is_aligned(const void* p, std::uintptr_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

// A row-major contiguous tensor whose data pointer is 16-byte aligned: t itself when it
// already is, else a fresh copy (the caching allocator returns >= 256-byte aligned blocks).
// Vectorised kernels and cuBLASLt epilogue pointers can then assume 16-byte alignment.
inline at::Tensor aligned_contiguous(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (c.numel() > 0 && !is_aligned(c.data_ptr(), 16)) {
    at::Tensor d = at::empty_like(c, at::MemoryFormat::Contiguous);
    d.copy_(c);
    return d;
  }
  return c;
}

// The accumulation dtype of the kernels (at::opmath_type as a ScalarType): double for double,
// float for float, half and bfloat16.
inline at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The empty (0,) tensor that stands for an output that was not asked for.
inline at::Tensor empty0(const at::TensorOptions& options) { return at::empty({0}, options); }

// The data of an optional input (undefined: nullptr), as T (checked against its dtype).
template <typename T>
inline const T* opt_data(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// ---------------------------------------------------------------------------------------------
// 2. Vector loads and stores (16 bytes: 8 half/bfloat16, 4 float, 2 double)
// ---------------------------------------------------------------------------------------------

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) AlignedVec {
  T val[VEC];
};

template <typename T>
struct VecWidth {
  static constexpr int value = 16 / static_cast<int>(sizeof(T));
};

// p must be aligned to sizeof(T) * VEC bytes.
template <int VEC, typename T>
__device__ __forceinline__ AlignedVec<T, VEC> load_vec(const T* p) {
  return *reinterpret_cast<const AlignedVec<T, VEC>*>(p);
}

template <int VEC, typename T>
__device__ __forceinline__ void store_vec(T* p, const AlignedVec<T, VEC>& v) {
  *reinterpret_cast<AlignedVec<T, VEC>*>(p) = v;
}

// ---------------------------------------------------------------------------------------------
// 3. Warp reductions: every lane of a full warp must call them (all 32 lanes active).
//    The butterfly order is fixed, so results are deterministic.
// ---------------------------------------------------------------------------------------------

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const acc_t o = __shfl_xor_sync(0xffffffffu, v, off);
    v = o > v ? o : v;
  }
  return v;
}

// Reductions over the G lanes of an aligned group (G a power of two <= 32: xor offsets below G
// stay inside the group), in warp_sum / warp_max's butterfly order (the same for G = 32). Every
// lane of the warp must call them.
template <int G, typename acc_t, typename Op>
__device__ __forceinline__ acc_t group_reduce(acc_t v, Op op) {
#pragma unroll
  for (int off = G / 2; off > 0; off >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

template <int G, typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t v) {
  return group_reduce<G>(v, [](acc_t a, acc_t b) { return a + b; });
}

template <int G, typename acc_t>
__device__ __forceinline__ acc_t group_max(acc_t v) {
  return group_reduce<G>(v, [](acc_t a, acc_t o) { return o > a ? o : a; });
}

// ---------------------------------------------------------------------------------------------
// 4. Activations (and the exp / log / log1p the loss kernels use) in the op-math type (float
//    or double). Precise library functions (the extension is not built with --use_fast_math).
//    __host__ too, so that host tests can check them.
// ---------------------------------------------------------------------------------------------

__host__ __device__ __forceinline__ float ml_exp(float v) { return expf(v); }
__host__ __device__ __forceinline__ double ml_exp(double v) { return exp(v); }
__host__ __device__ __forceinline__ float ml_log(float v) { return logf(v); }
__host__ __device__ __forceinline__ double ml_log(double v) { return log(v); }
__host__ __device__ __forceinline__ float ml_log1p(float v) { return log1pf(v); }
__host__ __device__ __forceinline__ double ml_log1p(double v) { return log1p(v); }
__host__ __device__ __forceinline__ float ml_erf(float v) { return erff(v); }
__host__ __device__ __forceinline__ double ml_erf(double v) { return erf(v); }
__host__ __device__ __forceinline__ float ml_tanh(float v) { return tanhf(v); }
__host__ __device__ __forceinline__ double ml_tanh(double v) { return tanh(v); }

template <typename acc_t>
__host__ __device__ __forceinline__ acc_t ml_sigmoid(acc_t z) {
  return acc_t(1) / (acc_t(1) + ml_exp(-z));
}

// GELU constants, as in ATen's GeluKernel.
constexpr double kSqrtHalf = 0.70710678118654752440;      // 1/sqrt(2)
constexpr double kInvSqrt2Pi = 0.39894228040143267794;    // 1/sqrt(2*pi)
constexpr double kSqrt2OverPi = 0.79788456080286535588;   // sqrt(2/pi)
constexpr double kGeluKappa = 0.044715;

// y = act(z). Softmax is row-wise and has its own kernels; None is the identity.
template <Act A, typename acc_t>
__host__ __device__ __forceinline__ acc_t act_forward(acc_t z) {
  if constexpr (A == Act::Relu) {
    return z < acc_t(0) ? acc_t(0) : z;  // NaN stays NaN, like torch.relu
  } else if constexpr (A == Act::Gelu) {
    return acc_t(0.5) * z * (acc_t(1) + ml_erf(z * acc_t(kSqrtHalf)));
  } else if constexpr (A == Act::GeluTanh) {
    const acc_t inner = acc_t(kSqrt2OverPi) * (z + acc_t(kGeluKappa) * z * z * z);
    return acc_t(0.5) * z * (acc_t(1) + ml_tanh(inner));
  } else if constexpr (A == Act::Silu) {
    return z * ml_sigmoid(z);
  } else if constexpr (A == Act::Sigmoid) {
    return ml_sigmoid(z);
  } else if constexpr (A == Act::Tanh) {
    return ml_tanh(z);
  } else {
    return z;
  }
}

// grad_pre = g * act'(.), where s is what saved_for(A) names: the pre-activation z for
// Gelu, GeluTanh, Silu; the output y for Relu, Sigmoid, Tanh. None: g.
template <Act A, typename acc_t>
__host__ __device__ __forceinline__ acc_t act_backward(acc_t g, acc_t s) {
  if constexpr (A == Act::Relu) {
    return s <= acc_t(0) ? acc_t(0) : g;  // as threshold_backward(g, y, 0): NaN passes g
  } else if constexpr (A == Act::Gelu) {
    const acc_t cdf = acc_t(0.5) * (acc_t(1) + ml_erf(s * acc_t(kSqrtHalf)));
    const acc_t pdf = ml_exp(acc_t(-0.5) * s * s) * acc_t(kInvSqrt2Pi);
    return g * (cdf + s * pdf);
  } else if constexpr (A == Act::GeluTanh) {
    const acc_t s2 = s * s;
    const acc_t inner = acc_t(kSqrt2OverPi) * (s + acc_t(kGeluKappa) * s2 * s);
    const acc_t t = ml_tanh(inner);
    const acc_t left_d = acc_t(0.5) * (acc_t(1) + t);
    const acc_t right_d = acc_t(0.5) * s * (acc_t(1) - t * t) * acc_t(kSqrt2OverPi) *
                          (acc_t(1) + acc_t(3.0 * kGeluKappa) * s2);
    return g * (left_d + right_d);
  } else if constexpr (A == Act::Silu) {
    const acc_t sg = ml_sigmoid(s);
    return g * sg * (acc_t(1) + s * (acc_t(1) - sg));
  } else if constexpr (A == Act::Sigmoid) {
    return g * s * (acc_t(1) - s);
  } else if constexpr (A == Act::Tanh) {
    return g * (acc_t(1) - s * s);
  } else {
    return g;
  }
}

}  // namespace cuda_common
}  // namespace manual_layers
