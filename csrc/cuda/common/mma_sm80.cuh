// PTX wrappers for sm_80+ kernels (csrc/cuda/losses/ce_tc.cu): cp.async copies global ->
// shared, mma.sync.m16n8k16 with bf16 / fp16 inputs and m16n8k8 with tf32 inputs (fp32
// accumulation), the tf32 split of a float, and float <-> raw 16-bit conversions. ML_SM80 is
// 1 in the device passes for sm_80 and newer: kernels guard their bodies with it (other passes
// compile an empty body). tests/cuda_emu/kernels_emu.cpp
// defines the same functions for its host emulation (ML_CUDA_HOST_EMU).
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define ML_SM80 1
#else
#define ML_SM80 0
#endif

namespace manual_layers {
namespace cuda_logreg {

// 16 bytes global -> shared, asynchronously; src_bytes 0 zero-fills the destination.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
#if ML_SM80
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem),
               "r"(src_bytes)
               : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if ML_SM80
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Wait until at most n (0 .. 3) of this thread's committed groups are still in flight.
__device__ __forceinline__ void cp_async_wait(int n) {
#if ML_SM80
  switch (n) {
    case 0: asm volatile("cp.async.wait_group 0;\n" ::: "memory"); break;
    case 1: asm volatile("cp.async.wait_group 1;\n" ::: "memory"); break;
    case 2: asm volatile("cp.async.wait_group 2;\n" ::: "memory"); break;
    default: asm volatile("cp.async.wait_group 3;\n" ::: "memory"); break;
  }
#endif
}

// d += a b for one m16n8k16 tile: a row-major 16 x 16, b column-major 16 x 8, f32 accumulate.
// Fragments (lane = 4 g + t): a[0] = A[g][2t, 2t+1], a[1] = A[g+8][2t, 2t+1],
// a[2] = A[g][2t+8, 2t+9], a[3] = A[g+8][2t+8, 2t+9]; b[0] = B[2t, 2t+1][g],
// b[1] = B[2t+8, 2t+9][g]; d[0..1] = D[g][2t, 2t+1], d[2..3] = D[g+8][2t, 2t+1]. The element
// with the lower k index sits in the lower 16 bits.
template <typename scalar_t>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2]) {
#if ML_SM80
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

// d += a b for one m16n8k8 tile with tf32 inputs (raw fp32 bits, the low 13 mantissa bits
// ignored), f32 accumulate. Fragments (lane = 4 g + t): a[0] = A[g][t], a[1] = A[g+8][t],
// a[2] = A[g][t+4], a[3] = A[g+8][t+4]; b[0] = B[t][g], b[1] = B[t+4][g]; d as for m16n8k16.
__device__ __forceinline__ void mma1688_tf32(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]) {
#if ML_SM80
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// v = hi + lo with hi = tf32(v) and lo = tf32(v - hi) (cvt.rna: to nearest, ties away from
// zero): hi + lo carries ~22 of fp32's 24 mantissa bits. From a float or its raw bits.
__device__ __forceinline__ void tf32_split(float v, uint32_t& hi, uint32_t& lo) {
#if ML_SM80
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(hi) : "f"(v));
  const float r = v - __uint_as_float(hi);
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(lo) : "f"(r));
#else
  hi = lo = 0;
#endif
}
__device__ __forceinline__ void tf32_split(uint32_t bits, uint32_t& hi, uint32_t& lo) {
#if ML_SM80
  tf32_split(__uint_as_float(bits), hi, lo);
#else
  hi = lo = bits;
#endif
}

// float <-> the raw bits of a 16-bit value (round to nearest even).
template <typename scalar_t>
__device__ __forceinline__ uint16_t to_bits(float v) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  } else {
    return __half_as_ushort(__float2half_rn(v));
  }
}
template <typename scalar_t>
__device__ __forceinline__ float from_bits(uint16_t v) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    return __bfloat162float(__ushort_as_bfloat16(v));
  } else {
    return __half2float(__ushort_as_half(v));
  }
}

}  // namespace cuda_logreg
}  // namespace manual_layers
