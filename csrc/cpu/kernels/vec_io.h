// 16-bit <-> acc_t vector loads and stores shared by every per-ISA CPU kernel file (Linear, MLP,
// the fused losses), built on ATen's vector conversions (vcvtph2ps, the bf16 shift). ATen's
// pointer-array at::vec::convert(const Half* / const BFloat16*, float*, n) has no x86 vector
// specialization (torch 2.14: the generic element loop of vec_base.h); fp16 rows widened through
// it made the fp16 binary loss pass several times slower than bf16's. Everything lands in
// manual_layers::CPU_CAPABILITY, in an anonymous namespace.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/vec_convert.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#ifndef CPU_CAPABILITY
#error "csrc/cpu/kernels/vec_io.h is for the per-ISA kernel files (-DCPU_CAPABILITY=...)"
#endif

namespace manual_layers {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Load n <= Vec::size() elements of T into a vector of the accumulation type (zero-padded).
template <typename T, typename acc_t>
inline Vectorized<acc_t> load(const T* p, int64_t n) {
  using Vec = Vectorized<acc_t>;
  if constexpr (std::is_same_v<T, acc_t>) {
    return n == Vec::size() ? Vec::loadu(p) : Vec::loadu(p, n);
  } else {
    // 16-bit -> float with ATen's vectorised conversion (AVX-512/AVX2: one vcvtph2ps or
    // bf16 shift per vector; DEFAULT: ATen's scalar loop); same values as static_cast.
    if (n == Vec::size()) {
      Vec out;
      at::vec::load_to_float<T>(p, out);
      return out;
    }
    return at::vec::convert<acc_t>(Vectorized<T>::loadu(p, n));
  }
}

template <typename T, typename acc_t>
inline void store(T* p, const Vectorized<acc_t>& v, int64_t n) {
  using Vec = Vectorized<acc_t>;
  if constexpr (std::is_same_v<T, acc_t>) {
    if (n == Vec::size()) v.store(p); else v.store(p, n);
  } else {
    // float -> 16-bit, vectorised, round to nearest even as static_cast<T>(float). A full
    // vector is stored at its own width (256 bits under AVX-512, 128 under AVX2): the generic
    // Vectorized<T>::store(p, n) would be a masked 512-bit (or a memcpy'd 256-bit) store.
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if (n == Vec::size()) {
      const auto h = std::is_same_v<T, c10::BFloat16> ? at::vec::cvtfp32_bf16(v)
                                                      : at::vec::cvtfp32_fp16(v);
#if defined(CPU_CAPABILITY_AVX512)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
#else
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
#endif
      return;
    }
#endif
    at::vec::convert<T>(v).store(p, n);
  }
}

// n values of T as acc_t into dst (exact widening; vectorised as load()).
template <typename T, typename acc_t>
inline void convert_row(const T* src, acc_t* dst, int64_t n) {
  constexpr int64_t V = Vectorized<acc_t>::size();
  for (int64_t j = 0; j < n; j += V) {
    const int64_t len = std::min<int64_t>(V, n - j);
    store<acc_t, acc_t>(dst + j, load<T, acc_t>(src + j, len), len);
  }
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace manual_layers
