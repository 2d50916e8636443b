// The sm_90a cluster instances of the tensor-core cross entropy (ce_tc_kernel with kCl; path
// 1c, ce_tc.cu): compiled only into a build that holds sm_90a code
// (MANUAL_LAYERS_CUDA_EXPERIMENTAL=1 with 9.0 in TORCH_CUDA_ARCH_LIST: ML_BUILT_SM90A) and into
// the host emulation of tests/cuda_emu, and run only when asked (MANUAL_LAYERS_CE_CLUSTER=1).
//
// Cluster instances (kCl; sm_90a; csrc/contracts/losses.h, ce_tc_cluster_shape_ok: 33 <= C <= 256,
// D up to 512, fp32 256; opt-in, MANUAL_LAYERS_CE_CLUSTER=1): past C = 64 one block's registers
// cannot hold the dW partials (C = 128, D = 512 is 64K floats, the SM's whole register file), so a
// cluster of K = ceil(C / 32) blocks shares each tile, block k owning the classes 32k .. 32k + 31
// (CP = 32) for the logits, residual, dW and grad_b, and the cluster (not the block) is the unit
// the tiles and partials are counted in. Per tile:
//   load   block k issues one bulk copy per row for rows k, k + K, ... of the tile, multicast to
//          every block of the cluster (csrc/cuda/common/cluster_sm90.cuh); each block's mbarrier for that stage
//          expects the whole tile's bytes. X is still read from memory once. Rows past N
//          copy row N - 1 again (zero residual), so every tile is the same number of bytes;
//   rows   each block reduces its own classes to (max m_k, sum e^(z - m_k), z_y if y is one
//          of them, sum w_c (m_k - z_c)), writes them to shared memory, and after one cluster
//          barrier lane k of the row's 8 reads block k's four numbers (distributed shared
//          memory) and the 8 lanes combine them: the same log-sum-exp, loss term and
//          smoothing sum in every block, in one fixed order. The statistics are double
//          buffered, so that one cluster barrier per tile suffices: it is also the point where
//          every block is done with the previous tile, and so where the next tile's copy into
//          that stage is issued;
//   dW     as above, for the block's 32 classes (rank 0 alone counts the loss), but 16-bit x
//          rounds the residual once (hi only, one mma per fragment): these instances are bound
//          by their mma (C = 128, D = 512: 4 N D C flops against 6 N D C with the split), and
//          one rounding is eager's own precision for it and below that of the 16-bit dW
//          returned (README, "How it works"); the loss, grad_b and the (N, C) residual are
//          unchanged.
// A last cluster barrier keeps every block resident until no other reads its statistics.
// Bitwise deterministic as the one-block instances.
//
#include <ATen/cuda/CUDAContext.h>
#include <c10/util/Exception.h>

#include "ce_tc_kernels.cuh"

namespace manual_layers {
namespace cuda_logreg {

// The cluster instance for nt column tiles of dW per warp (4, or 8 for 16-bit x): blocks of
// kClClasses classes each.
template <typename scalar_t>
CeFusedKernel<scalar_t> ce_tc_cluster_kernel(int nt) {
#if defined(ML_BUILT_SM90A) || defined(ML_CUDA_HOST_EMU)
  constexpr bool kF32 = std::is_same_v<scalar_t, float>;
  if (nt == 4) return ce_tc_kernel<scalar_t, kClClasses, 4, true>;
  if constexpr (!kF32) return ce_tc_kernel<scalar_t, kClClasses, 8, true>;
  return nullptr;  // unreachable (ce_tc_kernel_for asserts nt)
#else
  (void)nt;
  TORCH_CHECK(false, "ce_tc_kernel_for: the cluster instances are not in this build "
              "(MANUAL_LAYERS_CUDA_EXPERIMENTAL=1 with 9.0 in TORCH_CUDA_ARCH_LIST builds them)");
  return nullptr;
#endif
}

template CeFusedKernel<float> ce_tc_cluster_kernel<float>(int);
template CeFusedKernel<at::Half> ce_tc_cluster_kernel<at::Half>(int);
template CeFusedKernel<at::BFloat16> ce_tc_cluster_kernel<at::BFloat16>(int);

}  // namespace cuda_logreg

#ifndef ML_CUDA_HOST_EMU
bool ce_tc_cluster_device_ok(int device) {
#ifdef ML_BUILT_SM90A
  if (!ce_tc_cluster_enabled() || at::cuda::device_count() == 0) return false;
  if (device < 0) device = at::cuda::current_device();
  if (device >= at::cuda::device_count()) return false;
  const auto* prop = at::cuda::getDeviceProperties(device);
  return prop->major == 9 && prop->minor == 0;
#else
  (void)device;
  return false;
#endif
}
#endif  // ML_CUDA_HOST_EMU

}  // namespace manual_layers
