// CUDA logistic-regression losses, path 1b: fused multinomial cross entropy (linear_ce_fwd,
// reduction mean/sum, small C and D). X is read exactly once and no (N, C) buffer exists.
// loss_fwd.cu chooses the path (ce_fused_config) and prepares the inputs; common.cuh
// describes the op path file by file.
//
// Limits: C <= 32, D <= 1024 (D <= 512 when C > 16), W staged in shared memory as acc_t with
// C * round_up(D, 128) * sizeof(acc_t) <= 48 KB, all dynamic shared memory <= 96 KB (and the
// device's opt-in limit); fp64 only for C <= 16, D <= 512.
//
// ce_fused_kernel runs a fixed grid of B blocks (occupancy x SM count, at most ceil(N / 16)),
// 256 threads = 8 warps, over tiles of 16 rows (grid-stride loop):
//   A0  the block copies the tile's rows of X into shared memory (16-byte vector loads when
//       every row start is 16-byte aligned and D % VEC == 0, scalar otherwise);
//   A1  each warp takes 2 rows: lane holds columns 4 lane + 128 k, multiplies them with W
//       (shared, fp32) for all classes of both rows at once (each W load serves two rows),
//       then C warp butterflies per row give every lane all the logits (+ bias);
//   A2  stable log-softmax, loss term, residual r_c = dloss_i/dz_ic (csrc/contracts/losses.h formulas;
//       ignore_index: loss 0, r = 0), r to shared memory;
//   A3  when grad_x is wanted, the residual r_c / den (C acc_t values per row) to global
//       memory (backward writes dX = (g res) W by GEMM: csrc/contracts/losses.h);
//   B   thread t owns grad_W columns t + 256 j (j < DJ <= 4) for all classes in registers
//       (CMAX * DJ <= 64 accumulators) and adds r_c x_ic over the tile's rows in order;
//       thread c < C owns grad_b[c].
// At the end each block writes its disjoint columns to a [B, C, D] fp32 (fp64) workspace
// (O(B*C*D), never O(N)) plus [B, C] grad_b and [B] loss partials; finalize_kernel
// (common.cu) sums the B partials in a fixed order (bitwise deterministic, no float
// atomics) and divides by the mean denominator. For mean, ce_den_partial_kernel +
// ce_den_final_kernel (common.cu) put the
// denominator in one device element before the main kernel runs (same stream; no host
// sync), so the kernel can scale the residual. Shared-memory traffic for W (2 C D fp32 reads
// per two rows) and the C butterflies per row are the main costs beyond the X read;
// the kernel has not been timed (no GPU when written).
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "ce_fused_kernels.cuh"
#include "common.cuh"

namespace manual_layers {
namespace cuda_logreg {

// ---------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------

template <typename scalar_t>
CeFusedKernel<scalar_t> ce_fused_kernel_for(int cmax, int dj) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (sizeof(acc_t) == 8) {  // ce_fused_config allows only these for fp64
    TORCH_INTERNAL_ASSERT(cmax == 16 && dj <= 2, "ce_fused_kernel_for: fp64 config ", cmax, "/", dj);
    if (dj == 1) return ce_fused_kernel<scalar_t, acc_t, 16, 1>;
    return ce_fused_kernel<scalar_t, acc_t, 16, 2>;
  } else {
    if (cmax == 16) {
      if (dj == 1) return ce_fused_kernel<scalar_t, acc_t, 16, 1>;
      if (dj == 2) return ce_fused_kernel<scalar_t, acc_t, 16, 2>;
      return ce_fused_kernel<scalar_t, acc_t, 16, 4>;
    }
    if (dj == 1) return ce_fused_kernel<scalar_t, acc_t, 32, 1>;
    return ce_fused_kernel<scalar_t, acc_t, 32, 2>;
  }
}

// Left out of the host emulation of tests/cuda_emu, which runs the kernel (ce_fused_kernels.cuh)
// on the CPU.
#ifndef ML_CUDA_HOST_EMU
constexpr int64_t kCeMaxWBytes = 48 * 1024;     // W staged in shared memory (acc_t)
constexpr int64_t kCeMaxSmemBytes = 96 * 1024;  // all dynamic shared memory of a block

template <typename scalar_t>
bool ce_fused_config(int64_t C, int64_t D, CeFusedConfig* cfg) {
  using acc_t = at::opmath_type<scalar_t>;
  if (C < 1 || C > 32 || D < 1 || D > 4 * kThreads) return false;
  const int cmax = C <= 16 ? 16 : 32;
  const int64_t dj_need = ceil_div(D, kThreads);
  const int dj = dj_need <= 1 ? 1 : (dj_need <= 2 ? 2 : 4);
  if (cmax * dj > 64) return false;  // grad_W register accumulators per thread
  // fp64: the (16, 4), (32, 1) and (32, 2) instances spill registers (ptxas, sm_90): not built.
  if (sizeof(acc_t) == 8 && (cmax > 16 || dj > 2)) return false;
  const int64_t DS = ceil_div(D, kCeColStep) * kCeColStep;
  if (C * DS * static_cast<int64_t>(sizeof(acc_t)) > kCeMaxWBytes) return false;
  const size_t smem = ce_fused_smem<scalar_t>(C, DS, cmax);
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  // Leave 1 KB of the opt-in limit for the kernel's static shared memory (s_loss).
  const int64_t optin = static_cast<int64_t>(prop->sharedMemPerBlockOptin) - 1024;
  if (static_cast<int64_t>(smem) > std::min<int64_t>(kCeMaxSmemBytes, optin)) return false;
  cfg->cmax = cmax;
  cfg->dj = dj;
  cfg->smem = smem;
  return true;
}

template <typename scalar_t>
LossOut ce_fused_path(const Prepared& q, const CeFusedConfig& cfg, int64_t ignore_index,
                      double label_smoothing, int64_t reduction, bool need_x, bool need_w,
                      bool need_b) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t VEC = 16 / sizeof(scalar_t);
  CeFusedParams<scalar_t, acc_t> p{};
  p.x = q.x.data_ptr<scalar_t>();
  p.w = q.w_acc.data_ptr<acc_t>();
  // Every row start is aligned iff the base is and a row is a whole number of vectors.
  p.vec_ok = (reinterpret_cast<uintptr_t>(p.x) % 16 == 0) && (q.D % VEC == 0);
  return ce_single_pass<scalar_t>(q, p, ce_fused_kernel_for<scalar_t>(cfg.cmax, cfg.dj), cfg.smem,
                                  kCeTile, ignore_index, label_smoothing, reduction, need_x,
                                  need_w, need_b);
}

template <typename scalar_t>
LossOut ce_single_pass(const Prepared& q, CeFusedParams<scalar_t, at::opmath_type<scalar_t>> p,
                       CeFusedKernel<scalar_t> kernel, size_t smem, int64_t tile_rows,
                       int64_t ignore_index, double label_smoothing, int64_t reduction,
                       bool need_x, bool need_w, bool need_b, int cluster,
                       int64_t max_clusters) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::Tensor& x = q.x;
  const int64_t N = q.N, D = q.D, C = q.C;
  const auto acc_opts = x.options().dtype(acc_type_of(x.scalar_type()));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  p.bias = opt_data<acc_t>(q.bias_acc);
  p.target = q.itarget.data_ptr<int64_t>();
  p.cw = opt_data<acc_t>(q.cw_acc);
  p.N = N;
  p.ignore_index = ignore_index;
  p.D = static_cast<int>(D);
  p.C = static_cast<int>(C);
  p.eps = static_cast<acc_t>(label_smoothing);

  // Mean denominator on the device, finalized before the main kernel (same stream), which
  // needs it for the dX scale; no host sync.
  at::Tensor den_ws, den_final;
  if (reduction == kMean) {
    const int64_t n_den = grid_for(N, kThreads);
    den_ws = at::empty({n_den}, acc_opts);
    launch_ce_den_partial(p.target, p.cw, N, C, ignore_index, den_ws.data_ptr<acc_t>(), n_den,
                          stream);
    den_final = at::empty({1}, acc_opts);
    launch_ce_den_final(den_ws.data_ptr<acc_t>(), n_den, den_final.data_ptr<acc_t>(), stream);
    p.den = den_final.data_ptr<acc_t>();
  }

  at::Tensor res = need_x ? at::empty({N, C}, acc_opts) : empty0(acc_opts);
  p.res = need_x ? res.data_ptr<acc_t>() : nullptr;

  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  // grid: the partials' count (blocks, or clusters of `cluster` blocks), at most one per tile.
  cudaLaunchConfig_t lc{};
  cudaLaunchAttribute attr[1];
  int64_t grid = 0;
  if (cluster > 1) {
    TORCH_INTERNAL_ASSERT(max_clusters > 0, "ce_single_pass: no cluster of ", cluster,
                          " blocks fits (ce_tc_config checks this)");
    grid = std::max<int64_t>(1, std::min<int64_t>(max_clusters, ceil_div(N, tile_rows)));
    lc = cluster_launch_config(cluster, grid, smem, stream, attr);
  } else {
    int per_sm = 0;
    C10_CUDA_CHECK(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
    per_sm = std::max(per_sm, 1);
    grid = std::max<int64_t>(
        1, std::min<int64_t>(static_cast<int64_t>(per_sm) * num_sms(), ceil_div(N, tile_rows)));
  }

  at::Tensor ws_gw = need_w ? at::empty({grid, C * D}, acc_opts) : at::Tensor();
  at::Tensor ws_gb = need_b ? at::empty({grid, C}, acc_opts) : at::Tensor();
  at::Tensor ws_loss = at::empty({grid}, acc_opts);
  p.ws_gw = need_w ? ws_gw.data_ptr<acc_t>() : nullptr;
  p.ws_gb = need_b ? ws_gb.data_ptr<acc_t>() : nullptr;
  p.ws_loss = ws_loss.data_ptr<acc_t>();
  if (cluster > 1) {
    C10_CUDA_CHECK(cudaLaunchKernelEx(&lc, kernel, p));
  } else {
    kernel<<<grid, kThreads, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // finalize_kernel over the flattened (C * D) grad_W columns; grad_b has C entries.
  at::Tensor loss = at::empty({}, acc_opts);
  at::Tensor gw = need_w ? at::empty({C, D}, acc_opts) : empty0(acc_opts);
  at::Tensor gb = need_b ? at::empty({C}, acc_opts) : empty0(acc_opts);
  FinalizeParams<acc_t> fp{};
  fp.ws_gw = p.ws_gw;
  fp.ws_loss = p.ws_loss;
  fp.ws_gb = p.ws_gb;
  fp.den_ws = p.den;  // (1,) finalized denominator (n_den 1), or nullptr: host_den 1
  fp.n_den = p.den != nullptr ? 1 : 0;
  fp.host_den = acc_t(1);
  fp.gw_out = need_w ? gw.data_ptr<acc_t>() : nullptr;
  fp.gb_out = need_b ? gb.data_ptr<acc_t>() : nullptr;
  fp.loss_out = loss.data_ptr<acc_t>();
  fp.B = grid;
  fp.D = C * D;
  fp.nb = C;
  const int64_t fgrid = need_w ? std::max<int64_t>(1, ceil_div(C * D, 32)) : 1;
  launch_finalize(fp, fgrid, stream);
  return {loss, gw, gb, res};
}

cudaLaunchConfig_t cluster_launch_config(int cluster, int64_t clusters, size_t smem,
                                         cudaStream_t stream, cudaLaunchAttribute* attr) {
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(cluster);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cudaLaunchConfig_t lc{};
  lc.gridDim = dim3(static_cast<unsigned>(clusters * cluster));
  lc.blockDim = dim3(kThreads);
  lc.dynamicSmemBytes = smem;
  lc.stream = stream;
  lc.attrs = attr;
  lc.numAttrs = 1;
  return lc;
}

int max_active_clusters(const void* kernel, int cluster, size_t smem) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  cudaLaunchAttribute attr[1];
  const cudaLaunchConfig_t lc = cluster_launch_config(cluster, 1, smem, nullptr, attr);
  int clusters = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&clusters, kernel, &lc));
  return clusters;
}

#define ML_INSTANTIATE_CE_FUSED(scalar_t)                                                     \
  template bool ce_fused_config<scalar_t>(int64_t, int64_t, CeFusedConfig*);                 \
  template LossOut ce_fused_path<scalar_t>(const Prepared&, const CeFusedConfig&, int64_t,   \
                                           double, int64_t, bool, bool, bool);               \
  template LossOut ce_single_pass<scalar_t>(                                                  \
      const Prepared&, CeFusedParams<scalar_t, at::opmath_type<scalar_t>>,                    \
      CeFusedKernel<scalar_t>, size_t, int64_t, int64_t, double, int64_t, bool, bool, bool, int, \
      int64_t);
ML_INSTANTIATE_CE_FUSED(float)
ML_INSTANTIATE_CE_FUSED(double)
ML_INSTANTIATE_CE_FUSED(at::Half)
ML_INSTANTIATE_CE_FUSED(at::BFloat16)
#undef ML_INSTANTIATE_CE_FUSED
#endif  // ML_CUDA_HOST_EMU

}  // namespace cuda_logreg
}  // namespace manual_layers
