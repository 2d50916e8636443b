// PTX wrappers for sm_90a thread-block clusters (csrc/cuda/losses/ce_tc.cu, the cluster
// instances): the block's rank and the cluster's size and index, the cluster barrier, loads from
// a peer block's shared memory (distributed shared memory), mbarriers with transaction counts,
// and the bulk copy global -> shared that lands in every block of the cluster at once
// (cp.async.bulk ... .multicast::cluster, sm_90a only).
//
// ML_SM90A is 1 in the device pass for sm_90a (TORCH_CUDA_ARCH_LIST "9.0", which setup.py
// compiles as 9.0a); kernels guard their cluster code with it and every other pass compiles
// __trap(). The host side runs those instances only where the build holds sm_90a code
// (ML_BUILT_SM90A, defined by setup.py) and the device is compute capability 9.0.
// tests/cuda_emu/kernels_emu.cpp defines the same functions for its host emulation
// (ML_CUDA_HOST_EMU), where a cluster's blocks run concurrently.
#pragma once

#include <cstdint>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define ML_SM90A 1
#else
#define ML_SM90A 0
#endif

namespace manual_layers {
namespace cuda_logreg {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// This block's rank in its cluster and the cluster's size in blocks. (For a 1-D grid of 1-D
// clusters, cluster i is blocks i K .. i K + K - 1: the kernel derives its cluster's index.)
__device__ __forceinline__ int cluster_rank() {
  uint32_t r = 0;
#if ML_SM90A
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
#endif
  return static_cast<int>(r);
}
__device__ __forceinline__ int cluster_size() {
  uint32_t r = 1;
#if ML_SM90A
  asm volatile("mov.u32 %0, %%cluster_nctarank;\n" : "=r"(r));
#endif
  return static_cast<int>(r);
}

// Every thread of every block of the cluster: the shared-memory writes before it are visible
// to the loads after it in every block (release / acquire at cluster scope).
__device__ __forceinline__ void cluster_sync() {
#if ML_SM90A
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#endif
}

// The address of *p (this block's shared memory) in the block of rank `rank`: a generic
// pointer that ordinary loads read through the cluster's distributed shared memory.
template <typename T>
__device__ __forceinline__ const T* cluster_map(const T* p, int rank) {
#if ML_SM90A
  uint64_t out = 0;
  asm volatile("mapa.u64 %0, %1, %2;\n"
               : "=l"(out)
               : "l"(reinterpret_cast<uint64_t>(p)), "r"(static_cast<uint32_t>(rank)));
  return reinterpret_cast<const T*>(out);
#else
  (void)rank;
  return p;
#endif
}

// mbarrier: init with the number of arrivals per phase (once, before the cluster_sync that
// publishes it; fence_mbarrier_init orders the init before the other blocks' copies signal it).
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, int count) {
#if ML_SM90A
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count)
               : "memory");
#endif
}
__device__ __forceinline__ void fence_mbarrier_init() {
#if ML_SM90A
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
// One arrival on this phase that also expects `bytes` more bytes of copies to complete on it
// (the copies may complete before or after it).
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#if ML_SM90A
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)),
               "r"(bytes)
               : "memory");
#endif
}
// Wait until the phase of parity `parity` has completed (its arrivals and bytes all in); the
// copies' data is then visible to the waiting thread.
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
#if ML_SM90A
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "ML_MBAR_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra ML_MBAR_WAIT;\n"
      "}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
#endif
}

// `bytes` (a multiple of 16; both addresses 16-byte aligned) from global memory to the same
// offset `dst` has in this block's shared memory, in every block of the cluster whose bit is
// set in `mask`; each of them counts the bytes on its mbarrier at `bar`'s offset.
__device__ __forceinline__ void bulk_load_multicast(void* dst, const void* src, uint32_t bytes,
                                                    uint64_t* bar, uint16_t mask) {
#if ML_SM90A
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster "
      "[%0], [%1], %2, [%3], %4;\n" ::"r"(smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar)), "h"(mask)
      : "memory");
#endif
}

}  // namespace cuda_logreg
}  // namespace manual_layers
