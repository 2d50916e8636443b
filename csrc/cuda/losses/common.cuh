// CUDA losses (linear_bce, linear_ce): what the files of the op path share
// (csrc/contracts/losses.h is the contract).
//
// The op path, file by file (all in csrc/cuda/losses/):
//   loss_fwd.cu         host: argument checks, dtype conversion (Prepared), N == 0, the choice of
//                       path, TORCH_LIBRARY_IMPL registration of _linear_bce_fwd / _linear_ce_fwd
//   bce_fused.cu        path 1, fused binary cross entropy (X read once)
//   ce_fused.cu         path 1b, fused multinomial cross entropy (X read once), and the host
//                       side of the single-pass CE kernels (ce_single_pass)
//   ce_tc.cu            path 1c, the same on tensor cores for 16-bit and fp32 x (X read once)
//   gemm_path.cu        path 2, GEMM + row kernels (everything else); its cross-entropy row
//                       kernel is also the row pass of the chunked CE (ce_chunked_rows.cu)
//   common.cu           finalize_kernel (the last step of every mean/sum path) and the
//                       cross-entropy mean-denominator kernels
// This header holds the parameters, loss terms and block sums they share, the launchers of the
// shared kernels, and the entry points of the paths.
//
// Kernel templates are compiled in the one file that launches them: without relocatable device
// code, a __global__ template is compiled into every .cu file that launches it, so the shared
// kernels are reached through the launchers declared here (defined and explicitly instantiated
// in one file each, for the types that are used).
//
// Everything runs on the current stream in a fixed order (no float atomics: bitwise
// deterministic), and nothing waits on the host.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "../../common.h"
#include "../../contracts/losses.h"
#include "../common/cuda_common.cuh"

namespace manual_layers {
namespace cuda_logreg {

// The cuda_common helpers the logreg files use.
using cuda_common::AlignedVec;
using cuda_common::acc_type_of;
using cuda_common::ceil_div;
using cuda_common::empty0;
using cuda_common::grid_for;
using cuda_common::group_max;
using cuda_common::group_sum;
using cuda_common::kThreads;
using cuda_common::ml_exp;
using cuda_common::ml_log;
using cuda_common::ml_log1p;
using cuda_common::num_sms;
using cuda_common::opt_data;
using cuda_common::warp_max;
using cuda_common::warp_sum;

constexpr int kWarps = kThreads / 32;

// ---------------------------------------------------------------------------------------
// Block sums (all kThreads threads of the block must call them)
// ---------------------------------------------------------------------------------------

// Fixed-order tree sum over the block.
template <typename acc_t>
__device__ acc_t block_sum(acc_t v, acc_t* sbuf) {
  const int tid = threadIdx.x;
  sbuf[tid] = v;
  __syncthreads();
#pragma unroll
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (tid < s) sbuf[tid] += sbuf[tid + s];
    __syncthreads();
  }
  const acc_t r = sbuf[0];
  __syncthreads();  // sbuf may be reused right after
  return r;
}

// Sum of n per-block partials, in a fixed order; the same value in every block that calls it.
template <typename acc_t>
__device__ acc_t block_sum_partials(const acc_t* part, int64_t n, acc_t* sbuf) {
  acc_t v = 0;
  for (int64_t k = threadIdx.x; k < n; k += kThreads) v += part[k];
  return block_sum(v, sbuf);
}

// ---------------------------------------------------------------------------------------
// Loss terms (csrc/contracts/losses.h formulas)
// ---------------------------------------------------------------------------------------

// One binary cross-entropy term, torch's formulas (binary_cross_entropy_with_logits and its
// backward): lw = 1 + (pw - 1) y,
//   loss = sw * ((1 - y) z - lw * log_sigmoid(z)),  log_sigmoid(z) = min(z, 0) - log1p(e^-|z|)
//   r    = sw * (lw * sigmoid(z) - pw y)             (= sw * (sigmoid(z) - y) without pw)
// Paths 1 (bce_fused.cu) and 2 (gemm_path.cu).
template <typename acc_t>
__device__ __forceinline__ void bce_term(acc_t z, acc_t y, bool has_pw, acc_t pw, acc_t sw,
                                         acc_t& loss, acc_t& r) {
  const acc_t az = z < acc_t(0) ? -z : z;
  const acc_t e = ml_exp(-az);  // in (0, 1]
  const acc_t log_sig = (z < acc_t(0) ? z : acc_t(0)) - ml_log1p(e);
  const acc_t sig = z >= acc_t(0) ? acc_t(1) / (acc_t(1) + e) : e / (acc_t(1) + e);
  if (has_pw) {
    const acc_t lw = (pw - acc_t(1)) * y + acc_t(1);
    loss = sw * ((acc_t(1) - y) * z - lw * log_sig);
    r = sw * (lw * sig - pw * y);
  } else {
    loss = sw * ((acc_t(1) - y) * z - log_sig);
    r = sw * (sig - y);
  }
}

// Gradient sums are divided by the mean denominator unless it is 0, which happens (N > 0)
// only for cross entropy with every row ignored (or with zero class weights): then they are
// 0, as on the CPU (scale 0), and the loss is NaN. Zero class weights with label smoothing
// leave nonzero residuals, so "unscaled" would not be 0 there (nor would r / 0 be finite).
template <typename acc_t>
__device__ __forceinline__ acc_t grad_div(acc_t t, acc_t den) {
  return den != acc_t(0) ? t / den : acc_t(0);
}

// ---------------------------------------------------------------------------------------
// Shared kernels (common.cu), float and double
// ---------------------------------------------------------------------------------------

// finalize_kernel: fixed-order sums of the per-block partials of a path, divided by the mean
// denominator. grid: max(1, ceil(D / 32)) blocks when grad_w is wanted, else 1. Block b handles
// columns [32 b, 32 b + 32); block 0 also writes the loss and grad_b.
template <typename acc_t>
struct FinalizeParams {
  const acc_t* ws_gw;    // (B, D) or nullptr
  const acc_t* ws_loss;  // (B,)
  const acc_t* ws_gb;    // (B, C) or nullptr (C == nb)
  const acc_t* den_ws;   // (n_den,) partial denominators, or nullptr: use host_den
  acc_t* gw_out;         // (D,) (one class) or nullptr
  acc_t* gb_out;         // (nb,) or nullptr
  acc_t* loss_out;       // 0-d
  int64_t B;
  int64_t D;
  int64_t nb;
  int64_t n_den;
  acc_t host_den;
};

template <typename acc_t>
void launch_finalize(const FinalizeParams<acc_t>& p, int64_t grid, cudaStream_t stream);

// Partial mean denominators of cross entropy: per block (grid blocks of kThreads threads), the
// sum of class_weight[target] (1 without weights) over rows that are not ignored (an
// out-of-range class index, not ignore_index, raises a device assert). Consumers sum the
// partials with block_sum_partials.
template <typename acc_t>
void launch_ce_den_partial(const int64_t* target, const acc_t* cw, int64_t N, int64_t C,
                           int64_t ignore_index, acc_t* den_ws, int64_t grid,
                           cudaStream_t stream);

// The final mean denominator in one element: the fixed-order sum of the n_den partials
// (block_sum_partials, the order finalize_kernel and ce_rows_kernel use). One block.
template <typename acc_t>
void launch_ce_den_final(const acc_t* den_ws, int64_t n_den, acc_t* den_out, cudaStream_t stream);

// ---------------------------------------------------------------------------------------
// Cross-entropy row kernel (gemm_path.cu): path 2's and the chunked CE's row pass
// ---------------------------------------------------------------------------------------

// A warp per row (C <= 16: a group of lanes, several rows per warp), lanes over classes; bias
// added in acc_t; stable log-softmax; the loss of csrc/contracts/losses.h (eps = label smoothing,
// w = class weights, y = the row's class)
//   loss = (1 - eps) w_y (lse - z_y) + (eps / C) sum_c w_c (lse - z_c);
// the residual, as in ce_fused.cu,
//   r_c = a p_c - (1 - eps) w_y [c == y] - (eps / C) w_c,  a = (1 - eps) w_y + (eps / C) sum_k w_k,
// then scaled:
//   res_scale == nullptr: r / den (grad_div), den the mean denominator: the fixed-order sum of
//                         den_ws's n_den partials, or host_den when den_ws == nullptr (path 2:
//                         1 for sum and none);
//   res_scale != nullptr: r * res_scale[0] (* row_scale[i] when given) (the chunked CE: 1/den
//                         or 1, computed on the device; grad_output_i for none's backward).
// res may alias logits (res_t == scalar_t: the chunked CE writes the residual over its logits
// chunk in place). An ignored row (and, with device asserts compiled out, a row whose class
// index is out of range) has loss 0 and residual 0.
template <typename scalar_t, typename res_t>
struct CeRowsParams {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* logits;   // (N, C), without the bias
  res_t* res;               // (N, C) residual out, or nullptr
  acc_t* loss_out;          // (N,) per-row losses, or nullptr
  acc_t* ws_loss;           // (gridDim.x,) per-block loss partials, or nullptr
  const acc_t* bias;        // (C,) or nullptr
  const int64_t* target;    // (N,) class indices
  const acc_t* cw;          // (C,) class weights or nullptr
  const acc_t* den_ws;      // (n_den,) partial mean denominators, or nullptr: host_den
  int64_t n_den;
  acc_t host_den;
  const acc_t* res_scale;   // (1,) or nullptr (see above)
  const acc_t* row_scale;   // (N,) or nullptr; only with res_scale
  int64_t N;
  int64_t C;
  int64_t ignore_index;
  acc_t eps;                // label smoothing
};

// Instantiated for <scalar_t, acc_t> (path 2) and <scalar_t, scalar_t> (the chunked CE) of
// float, double, at::Half and at::BFloat16. grid: grid_for(N, kWarps).
template <typename scalar_t, typename res_t>
void launch_ce_rows(const CeRowsParams<scalar_t, res_t>& p, int64_t grid, cudaStream_t stream);

// ---------------------------------------------------------------------------------------
// Paths (chosen in loss_fwd.cu; each explicitly instantiated for float, double, at::Half and
// at::BFloat16 in its file)
// ---------------------------------------------------------------------------------------

// Everything the paths need, prepared once by loss_fwd.cu (dtypes converted, contiguous).
struct Prepared {
  at::Tensor x, weight, w_acc, bias_acc, ftarget, itarget, pw_acc, sw, cw_acc;
  int64_t N = 0, D = 0, C = 0;
};

// Path 1 (bce_fused.cu): C == 1, mean/sum. Its configuration for D (group chunks and
// warps per row), or false when D is too large for it. Needs q.w_acc: (D,) acc_t weight.
template <typename scalar_t>
bool bce_fused_config(int64_t D, int* chunks, int* wpr);
template <typename scalar_t>
LossOut bce_fused_path(const Prepared& q, int chunks, int wpr, int64_t reduction, bool need_x,
                       bool need_w, bool need_b);

// Path 1b (ce_fused.cu): mean/sum, small C and D. Its configuration, or false when the
// shape is outside its limits. Needs q.w_acc: (C, D) acc_t weight.
struct CeFusedConfig {
  int cmax = 0;    // 16 or 32
  int dj = 0;      // 1, 2 or 4
  size_t smem = 0; // dynamic shared memory per block, bytes
};
template <typename scalar_t>
bool ce_fused_config(int64_t C, int64_t D, CeFusedConfig* cfg);
template <typename scalar_t>
LossOut ce_fused_path(const Prepared& q, const CeFusedConfig& cfg, int64_t ignore_index,
                      double label_smoothing, int64_t reduction, bool need_x, bool need_w,
                      bool need_b);

// Path 1c (ce_tc.cu): the same contract as 1b on tensor cores, for 16-bit and fp32 x (3xTF32) in
// the shapes of ce_tc_shape_ok (csrc/contracts/losses.h) on sm_80+. Its configuration, or false
// when the kernel is off (MANUAL_LAYERS_CE_TC=0), the device is older than sm_80 or lacks the
// shared memory. Instantiated for float, at::Half and at::BFloat16.
struct CeTcConfig {
  int cp = 0;      // classes padded to 16, 32 or 64
  int nt = 0;      // dW column tiles of 8 per warp: 4, 8 or 16
  int stages = 0;  // row tiles of x in flight (cp.async or bulk-copy pipeline): 2 to 4
  size_t smem = 0; // dynamic shared memory per block, bytes
  int cluster = 1; // blocks per cluster: 1, or ceil(C / 32) (ce_tc_cluster_shape_ok)
  int64_t max_clusters = 0;  // cluster > 1: how many can be resident at once (>= 1)
};
template <typename scalar_t>
bool ce_tc_config(int64_t C, int64_t D, CeTcConfig* cfg);
template <typename scalar_t>
LossOut ce_tc_path(const Prepared& q, const CeTcConfig& cfg, int64_t ignore_index,
                   double label_smoothing, int64_t reduction, bool need_x, bool need_w,
                   bool need_b);

// The parameters of the single-pass cross-entropy kernels (paths 1b and 1c): both write
// per-block partials that ce_single_pass sums with finalize_kernel.
template <typename scalar_t, typename acc_t>
struct CeFusedParams {
  const scalar_t* x;       // (N, D)
  const acc_t* w;          // (C, D) weight in acc_t (path 1b)
  const scalar_t* wx;      // (C, D) weight in x's dtype (path 1c)
  const acc_t* bias;       // (C,) or nullptr
  const int64_t* target;   // (N,)
  const acc_t* cw;         // (C,) class weights or nullptr
  const acc_t* den;        // (1,) finalized mean denominator, or nullptr (sum: 1)
  acc_t* res;              // (N, C) residual / den, or nullptr (need_x)
  acc_t* ws_gw;            // (B, C, D) or nullptr (need_weight)
  acc_t* ws_gb;            // (B, C) or nullptr (need_bias)
  acc_t* ws_loss;          // (B,)
  int64_t N;
  int64_t ignore_index;
  int D;
  int C;
  acc_t eps;               // label smoothing
  bool vec_ok;             // path 1b: x rows start 16-byte aligned and D % VEC == 0
  int stages;              // path 1c: cp.async pipeline depth
};

template <typename scalar_t>
using CeFusedKernel = void (*)(CeFusedParams<scalar_t, at::opmath_type<scalar_t>>);

// The host side both single-pass kernels share (ce_fused.cu): the mean denominator on
// the device, the residual and workspaces, the launch (grid: occupancy x SMs, at most
// ceil(N / tile_rows) blocks) and finalize_kernel. p carries the kernel's own fields (w or
// wx, vec_ok, stages); the rest is filled in here. cluster > 1: the kernel runs as clusters of
// that many blocks (path 1c's cluster instances), at most max_clusters of them
// (max_active_clusters), one partial per cluster.
template <typename scalar_t>
LossOut ce_single_pass(const Prepared& q, CeFusedParams<scalar_t, at::opmath_type<scalar_t>> p,
                       CeFusedKernel<scalar_t> kernel, size_t smem, int64_t tile_rows,
                       int64_t ignore_index, double label_smoothing, int64_t reduction,
                       bool need_x, bool need_w, bool need_b, int cluster = 1,
                       int64_t max_clusters = 0);

// The cluster instances' launch (ce_fused.cu): the configuration of `clusters` clusters
// of `cluster` blocks of kThreads threads with `smem` bytes of dynamic shared memory each (attr:
// storage for its cluster-dimension attribute), and how many such clusters of `kernel` can be
// resident at once (0: none fits; sets the kernel's dynamic shared-memory limit first).
cudaLaunchConfig_t cluster_launch_config(int cluster, int64_t clusters, size_t smem,
                                         cudaStream_t stream, cudaLaunchAttribute* attr);
int max_active_clusters(const void* kernel, int cluster, size_t smem);

// Path 2 (gemm_path.cu): every case; binary selects the BCE row kernel.
template <typename scalar_t>
LossOut gemm_path(const Prepared& q, bool binary, int64_t ignore_index, double label_smoothing,
                  int64_t reduction, bool need_x, bool need_w, bool need_b);

}  // namespace cuda_logreg
}  // namespace manual_layers
