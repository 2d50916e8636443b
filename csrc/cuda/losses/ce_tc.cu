// CUDA logistic-regression losses, path 1c: fused multinomial cross entropy on tensor cores
// (linear_ce_fwd, reduction mean/sum; bf16, fp16 and fp32 x). The contract, the outputs and the
// host side are path 1b's (ce_fused.cu: ce_single_pass); loss_fwd.cu chooses the path
// (ce_tc_config) and common.cuh describes the op path file by file.
//
// Why: path 1b computes its dot products on CUDA cores and is bound by them (an H100 profile of the
// first release, docs/perf-h100-2026-11-28.md; figures in docs/perf-notes-from-code.md). Here
// both products of the pass run on tensor cores (mma.sync, fp32 accumulation; sm_80
// and sm_90), which leaves the pass bound by reading X once:
//   bf16 / fp16  m16n8k16 on the 16-bit values;
//   fp32         m16n8k8 tf32, each product as 3xTF32 (a = a_hi + a_lo with a_hi = tf32(a),
//                a_lo = tf32(a - a_hi); a b ~ a_lo b_hi + a_hi b_lo + a_hi b_hi): fp32 accuracy
//                (about 2e-7 relative in tests/cuda_emu/test_cuda_emu.py), no TF32 shortcut.
//
// Shapes (csrc/contracts/losses.h, ce_tc_shape_ok): D a multiple of 8; C <= 16 with D <= 1024
// (fp32: 512), C <= 32 with D <= 512 (fp32: 256), C <= 64 with D <= 256 (fp32: 128); classes padded
// to CP = 16, 32 or 64.
//
// ce_tc_kernel: a fixed grid of B blocks (occupancy x SMs, at most ceil(N / 32)), 256 threads
// = 8 warps, each block over tiles of kTcRows = 32 rows (tile b, b + B, ...):
//   load   the block's next stages - 1 tiles of X are in flight at all times: cp.async 16-byte
//          copies into a ring of `stages` shared-memory tiles (rows past N zero-filled);
//   Z      logits Z (32 x CP) = X_tile W^T: warp w takes m-tile w % 2 (16 rows) and every 4th
//          k-step from w / 2 (A fragments from the X tile, B fragments from W, staged once per
//          block in shared memory); the 4 partial Z go to shared memory and are added in a
//          fixed order;
//   rows   8 lanes per row (CP / 8 classes each): + bias, stable log-softmax, the loss term
//          and the residual r of csrc/contracts/losses.h (class weights, label smoothing, ignore_index:
//          the formulas of path 1b); r / den to the (N, C) residual for backward's dX; r to
//          shared memory, transposed (classes x rows): fp32, or for 16-bit x split into two
//          16-bit parts (hi = round(r), lo = round(r - hi): ~16 bits of mantissa);
//   dW     dW (CP x D) += R^T X_tile (16-bit: two mma per fragment, hi and lo; fp32: 3xTF32):
//          warp w owns the column tiles w, w + 8, ... of 8 columns (NT of them) for all
//          classes; the accumulators stay in registers for the whole loop (CP x D / 256 floats
//          per thread).
// At the end the block writes its dW, grad_b and loss partials; finalize_kernel adds the B
// partials in a fixed order and divides by the mean denominator. Bitwise deterministic: fixed
// tile assignment, fixed summation orders, no atomics.
//
// The sm_90a cluster instances (33 <= C <= 256): ce_tc_cluster.cu.
//
// Not yet run or timed on a GPU: none was available when it was written (README, "Known
// limitations"). tests/cuda_emu/test_cuda_emu.py runs the kernel code (ce_tc_kernels.cuh) in a
// host emulation (every shape class, against a float64 reference); tests/test_ce_tc.py checks it
// on a GPU.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "ce_tc_kernels.cuh"

namespace manual_layers {
namespace cuda_logreg {

// ---------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------

template <typename scalar_t>
CeFusedKernel<scalar_t> ce_tc_kernel_for(int cp, int nt, bool cluster) {
  // fp32 shapes stop at half the 16-bit D (ce_tc_shape_ok): no (16, 16) and (32, 8) instances;
  // CP = 64 (D <= 256, fp32 128) needs NT = 4 only; the clusters' CP = 32 blocks take D up to
  // 512 (fp32 256), NT 4 or 8 (fp32 4).
  constexpr bool kF32 = std::is_same_v<scalar_t, float>;
  const int nt_max = cp == 16 ? (kF32 ? 8 : 16) : (cp == 32 ? (kF32 ? 4 : 8) : 4);
  TORCH_INTERNAL_ASSERT((cp == 16 || cp == 32 || cp == 64) && nt <= nt_max &&
                            (!cluster || cp == kClClasses),
                        "ce_tc_kernel_for: no instance for CP ", cp, ", NT ", nt,
                        cluster ? " (cluster)" : "");
  if (cluster) {
    // The cluster instances are experimental (never run on a GPU): compiled only into a build
    // that holds sm_90a code (MANUAL_LAYERS_CUDA_EXPERIMENTAL=1) and into the host emulation;
    // ce_tc_cluster_device_ok is false otherwise, so this is not reached.
    return ce_tc_cluster_kernel<scalar_t>(nt);  // ce_tc_cluster.cu
  }
  if (cp == 16) {
    if (nt == 4) return ce_tc_kernel<scalar_t, 16, 4, false>;
    if (nt == 8) return ce_tc_kernel<scalar_t, 16, 8, false>;
    if constexpr (!kF32) return ce_tc_kernel<scalar_t, 16, 16, false>;
  }
  if (cp == 64) return ce_tc_kernel<scalar_t, 64, 4, false>;
  if (nt == 4) return ce_tc_kernel<scalar_t, 32, 4, false>;
  if constexpr (!kF32) return ce_tc_kernel<scalar_t, 32, 8, false>;
  return nullptr;  // unreachable (asserted above)
}

// The host side below is left out of the host emulation of tests/cuda_emu, which runs the
// kernel above on the CPU (ce_tc_smem, ce_tc_tiles and ce_tc_kernel_for serve both).
#ifndef ML_CUDA_HOST_EMU
// Whether the instance's code for the current device was compiled for sm_80 or newer (a build
// whose TORCH_CUDA_ARCH_LIST holds only older architectures would run the kernel's empty
// body, JIT-compiled from their PTX). Asked once per instance. The cluster instances need
// sm_90a code, which a device of compute capability 9.0 runs when the build holds it
// (ML_BUILT_SM90A: setup.py compiles TORCH_CUDA_ARCH_LIST's 9.0 as 9.0a); the function
// attributes cannot tell sm_90 from sm_90a.
template <typename scalar_t>
bool ce_tc_code_ok(int cp, int nt, bool cluster) {
  if (cluster) return ce_tc_cluster_device_ok(at::cuda::current_device());
  static std::atomic<int> known[3][3] = {{-1, -1, -1}, {-1, -1, -1}, {-1, -1, -1}};
  const int ci = cp == 16 ? 0 : (cp == 32 ? 1 : 2);
  std::atomic<int>& k = known[ci][nt == 4 ? 0 : (nt == 8 ? 1 : 2)];
  int v = k.load(std::memory_order_relaxed);
  if (v < 0) {
    cudaFuncAttributes attr{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(
        &attr, reinterpret_cast<const void*>(ce_tc_kernel_for<scalar_t>(cp, nt, false))));
    v = attr.ptxVersion >= 80 ? 1 : 0;
    k.store(v, std::memory_order_relaxed);
  }
  return v == 1;
}

template <typename scalar_t>
bool ce_tc_config(int64_t C, int64_t D, CeTcConfig* cfg) {
  constexpr auto dtype = c10::CppTypeToScalarType<scalar_t>::value;
  if (!ce_tc_enabled()) return false;
  const bool cluster = !ce_tc_shape_ok(dtype, C, D);
  if (cluster && !(ce_tc_cluster_enabled() && ce_tc_cluster_shape_ok(dtype, C, D))) return false;
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  if (prop->major < 8) return false;
  int cp = 0, nt = 0, blocks = 1;
  ce_tc_tiles(C, D, cluster, &cp, &nt, &blocks);
  if (cp / 16 * nt * 4 > 64) return false;  // dW accumulators per thread (ce_tc_shape_ok)
  if (!ce_tc_code_ok<scalar_t>(cp, nt, cluster)) return false;
  // The deepest ring of X tiles that fits the opt-in limit, at most 4 (>= 3 tiles in flight
  // keep the memory system busy while a tile is computed; more only costs occupancy).
  const int64_t limit = static_cast<int64_t>(prop->sharedMemPerBlockOptin);
  // A cluster's blocks must also be resident at once, on one GPC.
  for (int stages = 4; stages >= 2; --stages) {
    const size_t smem = ce_tc_smem<scalar_t>(cp, D, stages);
    if (static_cast<int64_t>(smem) > limit) continue;
    const int64_t max_clusters =
        cluster ? max_active_clusters(
                      reinterpret_cast<const void*>(ce_tc_kernel_for<scalar_t>(cp, nt, true)),
                      blocks, smem)
                : 0;
    if (!cluster || max_clusters > 0) {
      cfg->cp = cp;
      cfg->nt = nt;
      cfg->stages = stages;
      cfg->smem = smem;
      cfg->cluster = blocks;
      cfg->max_clusters = max_clusters;
      return true;
    }
  }
  return false;
}

template <typename scalar_t>
LossOut ce_tc_path(const Prepared& q, const CeTcConfig& cfg, int64_t ignore_index,
                   double label_smoothing, int64_t reduction, bool need_x, bool need_w,
                   bool need_b) {
  using acc_t = at::opmath_type<scalar_t>;
  static_assert(std::is_same_v<acc_t, float>, "path 1c: 16-bit and fp32 x");
  // cp.async copies 16-byte pieces: x (and so every row, D % 8 == 0) must start 16-byte
  // aligned; an offset view is copied once (the caching allocator aligns fresh blocks).
  Prepared qa = q;
  qa.x = cuda_common::aligned_contiguous(q.x);
  CeFusedParams<scalar_t, acc_t> p{};
  p.x = qa.x.data_ptr<scalar_t>();
  p.wx = q.weight.data_ptr<scalar_t>();  // contiguous (prepare_common)
  p.stages = cfg.stages;
  return ce_single_pass<scalar_t>(qa, p, ce_tc_kernel_for<scalar_t>(cfg.cp, cfg.nt,
                                                                   cfg.cluster > 1),
                                  cfg.smem, kTcRows, ignore_index, label_smoothing, reduction,
                                  need_x, need_w, need_b, cfg.cluster, cfg.max_clusters);
}

#define ML_INSTANTIATE_CE_TC(scalar_t)                                                        \
  template bool ce_tc_config<scalar_t>(int64_t, int64_t, CeTcConfig*);                       \
  template LossOut ce_tc_path<scalar_t>(const Prepared&, const CeTcConfig&, int64_t, double, \
                                        int64_t, bool, bool, bool);
ML_INSTANTIATE_CE_TC(float)
ML_INSTANTIATE_CE_TC(at::Half)
ML_INSTANTIATE_CE_TC(at::BFloat16)
#undef ML_INSTANTIATE_CE_TC
#endif  // ML_CUDA_HOST_EMU

}  // namespace cuda_logreg
}  // namespace manual_layers
