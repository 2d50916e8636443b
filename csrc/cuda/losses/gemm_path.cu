// CUDA logistic-regression losses, path 2: GEMM + row kernels, for every case the fused paths
// do not take (reduction none, binary with larger D, multinomial outside the limits of path 1b).
// loss_fwd.cu chooses the path and prepares the inputs; common.cuh describes the op path
// file by file.
//
// logits = x W^T through at::mm (cuBLAS, fp32 accumulation), then a row kernel of our own adds
// the bias in acc_t, computes the loss terms and writes the residual dloss/dlogits into an
// (N, C) acc_t buffer (divided by the mean's denominator for mean), then grad_w = R^T x through
// at::mm and grad_b = R.sum(0) through at::sum (fp32 accumulation). This reads X twice when
// grad_w is needed and holds an (N, C) buffer: correct and deterministic. For mean/sum the
// per-block loss partials go through finalize_kernel (common.cu); the cross-entropy mean
// denominator comes from ce_den_partial_kernel's partials, summed in the same fixed order by
// every consumer (no host sync).
//
// Row kernels: bce_rows_kernel (binary: one thread per row) and ce_rows_kernel (multinomial: a warp
// per row, or for C <= 16 a group of the next power of two >= C lanes). ce_rows_kernel is also the
// row pass of the chunked cross entropy (csrc/generic/ce_chunked.cpp, through ce_chunked_rows.cu
// and launch_ce_rows): there it writes the residual over the logits chunk in place, in x's dtype,
// times a device scale.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <limits>

#include "common.cuh"

namespace manual_layers {
namespace cuda_logreg {

// ---------------------------------------------------------------------------------------
// Row kernels. logits (N, C) in x's dtype, as at::mm wrote them, without the bias.
// ---------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
struct BceRowsParams {
  const scalar_t* logits;   // (N,)
  acc_t* res;               // (N,) residual out, or nullptr
  acc_t* loss_out;          // (N,) per-row loss (reduction none), or nullptr
  acc_t* ws_loss;           // (gridDim.x,) per-block loss partials, or nullptr
  const acc_t* bias;        // (1,) or nullptr
  const scalar_t* target;   // (N,) targets of x's dtype
  const acc_t* pos_weight;  // (1,) or nullptr
  const scalar_t* sw;       // (N,) or nullptr
  acc_t den;                // residual divisor: N for mean, 1 otherwise
  int64_t N;
};

// Binary: one thread per row.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) bce_rows_kernel(const BceRowsParams<scalar_t, acc_t> p) {
  __shared__ acc_t sbuf[kThreads];
  const acc_t den = p.den;
  const bool has_pw = p.pos_weight != nullptr;
  const acc_t pw = has_pw ? p.pos_weight[0] : acc_t(1);
  const acc_t bias = p.bias != nullptr ? p.bias[0] : acc_t(0);
  acc_t loss_acc = 0;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < p.N; i += step) {
    const acc_t z = static_cast<acc_t>(p.logits[i]) + bias;
    const acc_t y = static_cast<acc_t>(p.target[i]);
    const acc_t sw = p.sw != nullptr ? static_cast<acc_t>(p.sw[i]) : acc_t(1);
    acc_t loss_i, r;
    bce_term(z, y, has_pw, pw, sw, loss_i, r);
    loss_acc += loss_i;
    if (p.loss_out != nullptr) p.loss_out[i] = loss_i;
    if (p.res != nullptr) p.res[i] = r / den;
  }
  if (p.ws_loss != nullptr) {
    const acc_t s = block_sum(loss_acc, sbuf);
    if (threadIdx.x == 0) p.ws_loss[blockIdx.x] = s;
  }
}

// Multinomial: G lanes per row, lanes over classes (CeRowsParams in common.cuh says what
// it computes for its two callers). G = 32 (C > 16): one row per warp; C <= 16: G the smallest
// power of two >= C, 32 / G rows per warp at once (a warp per row of 10 classes leaves 22 of
// its lanes idle, in a pass whose few loads per row make it latency-bound; not yet timed on a
// GPU). Three passes over the row: the max; the sum of exponentials (with label smoothing also
// sum_c w_c (m - z_c) and sum_c w_c); the residual. The loop bounds are the same for every lane
// of a warp, so every lane reaches every shuffle; the lanes of a row past N compute and write
// nothing, those of an ignored row write a zero loss and zero residuals.
template <typename scalar_t, typename res_t, int G>
__global__ void __launch_bounds__(kThreads) ce_rows_kernel(const CeRowsParams<scalar_t, res_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  static_assert(G >= 2 && G <= 32 && (G & (G - 1)) == 0, "G: a power of two <= 32");
  constexpr int kRowsPerWarp = 32 / G;
  __shared__ acc_t sbuf[kThreads];
  __shared__ acc_t s_loss[kWarps];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int sub = lane % G;  // the lane's first class
  const int grp = lane / G;  // the lane's row among the warp's rows
  const acc_t den = p.den_ws != nullptr ? block_sum_partials(p.den_ws, p.n_den, sbuf) : p.host_den;
  const bool mul_scale = p.res_scale != nullptr;
  const acc_t res_scale = mul_scale ? p.res_scale[0] : acc_t(1);
  const int64_t C = p.C;
  const acc_t eps = p.eps;
  const acc_t eps_c = eps / static_cast<acc_t>(C);
  const bool smooth = eps != acc_t(0);
  acc_t loss_acc = 0;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarps * kRowsPerWarp;
  for (int64_t i0 = (static_cast<int64_t>(blockIdx.x) * kWarps + warp) * kRowsPerWarp; i0 < p.N;
       i0 += step) {
    const int64_t i = i0 + grp;
    const bool in_range = i < p.N;
    const scalar_t* zr = p.logits + (in_range ? i : 0) * C;
    res_t* rr = p.res != nullptr && in_range ? p.res + i * C : nullptr;
    auto logit = [&](int64_t c) {  // z_c in acc_t, with the bias
      return static_cast<acc_t>(zr[c]) + (p.bias != nullptr ? p.bias[c] : acc_t(0));
    };
    auto weight = [&](int64_t c) { return p.cw != nullptr ? p.cw[c] : acc_t(1); };
    const int64_t y = in_range ? p.target[i] : p.ignore_index;  // the same for the row's lanes
    if (in_range && y != p.ignore_index) {
      CUDA_KERNEL_ASSERT(y >= 0 && y < C && "cross entropy: target class index out of range");
    }
    // Out of range reaches here only if device asserts are compiled out: no memory access.
    const bool active = in_range && y != p.ignore_index && y >= 0 && y < C;
    acc_t m = -std::numeric_limits<acc_t>::infinity();
    if (active) {
      for (int64_t c = sub; c < C; c += G) {
        const acc_t z = logit(c);
        m = z > m ? z : m;
      }
    }
    m = group_max<G>(m);
    acc_t s = 0, sm = 0, wsum = 0;
    if (active) {
      for (int64_t c = sub; c < C; c += G) {
        const acc_t z = logit(c);
        s += ml_exp(z - m);
        if (smooth) {
          const acc_t wc = weight(c);
          sm += wc * (m - z);
          wsum += wc;
        }
      }
    }
    s = group_sum<G>(s);
    if (smooth) {
      sm = group_sum<G>(sm);
      wsum = group_sum<G>(wsum);
    }
    acc_t loss_i = 0, lse = 0, wy = 0;
    if (active) {
      lse = m + ml_log(s);
      wy = weight(y);
      const acc_t zy = logit(y);
      // loss = (1 - eps) w_y (lse - z_y) + (eps / C) sum_c w_c (lse - z_c), the smoothing sum
      // taken as (lse - m) sum_c w_c + sum_c w_c (m - z_c), so that one pass before lse gives it.
      loss_i = (acc_t(1) - eps) * wy * (lse - zy);
      if (smooth) loss_i += eps_c * ((lse - m) * wsum + sm);
    }
    // All reads of zr[y] by the row's lanes happen before any write below (the shuffles above
    // are warp-synchronous, and zr[y] is read before the residual loop): the residual may be
    // written over the logits.
    __syncwarp();
    if (rr != nullptr) {
      if (active) {
        // r_c = ((1-eps) w_y + (eps/C) sum_k w_k) p_c - (1-eps) w_y [c == y] - (eps/C) w_c,
        // then scaled (CeRowsParams)
        const acc_t a = (acc_t(1) - eps) * wy + eps_c * wsum;
        const acc_t coef = p.row_scale != nullptr ? res_scale * p.row_scale[i] : res_scale;
        for (int64_t c = sub; c < C; c += G) {
          acc_t r = a * ml_exp(logit(c) - lse);
          if (c == y) r -= (acc_t(1) - eps) * wy;
          if (smooth) r -= eps_c * weight(c);
          rr[c] = static_cast<res_t>(mul_scale ? r * coef : grad_div(r, den));  // den 0: zero
        }
      } else {
        for (int64_t c = sub; c < C; c += G) rr[c] = static_cast<res_t>(0);
      }
    }
    if (sub == 0 && in_range) {
      if (active) loss_acc += loss_i;
      if (p.loss_out != nullptr) p.loss_out[i] = loss_i;  // 0 for an ignored row
    }
  }
  if (p.ws_loss != nullptr) {
    // The rows' losses sit in the lanes sub == 0; with several rows per warp they are added by
    // a fixed butterfly (deterministic).
    if constexpr (G < 32) loss_acc = warp_sum(loss_acc);
    if (lane == 0) s_loss[warp] = loss_acc;
    __syncthreads();
    if (threadIdx.x == 0) {
      acc_t t = 0;
      for (int w = 0; w < kWarps; ++w) t += s_loss[w];
      p.ws_loss[blockIdx.x] = t;
    }
  }
}

// ---------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------

// Lanes per row by C (ce_rows_kernel). The grid stays the caller's (grid_for(N, kWarps)): the
// GEMM path sized its per-block loss partials to it; with several rows per warp, blocks past
// the rows run no iteration and write a zero partial.
// Left out of the host emulation of tests/cuda_emu, which runs the kernels above on the CPU.
#ifndef ML_CUDA_HOST_EMU
template <typename scalar_t, typename res_t, int G>
void launch_ce_rows_g(const CeRowsParams<scalar_t, res_t>& p, int64_t grid, cudaStream_t stream) {
  ce_rows_kernel<scalar_t, res_t, G><<<grid, kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename res_t>
void launch_ce_rows(const CeRowsParams<scalar_t, res_t>& p, int64_t grid, cudaStream_t stream) {
  if (p.C <= 2) launch_ce_rows_g<scalar_t, res_t, 2>(p, grid, stream);
  else if (p.C <= 4) launch_ce_rows_g<scalar_t, res_t, 4>(p, grid, stream);
  else if (p.C <= 8) launch_ce_rows_g<scalar_t, res_t, 8>(p, grid, stream);
  else if (p.C <= 16) launch_ce_rows_g<scalar_t, res_t, 16>(p, grid, stream);
  else launch_ce_rows_g<scalar_t, res_t, 32>(p, grid, stream);
}

template <typename scalar_t>
LossOut gemm_path(const Prepared& q, bool binary, int64_t ignore_index, double label_smoothing,
                  int64_t reduction, bool need_x, bool need_w, bool need_b) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::Tensor& x = q.x;
  const int64_t N = q.N, C = q.C;
  const auto acc_opts = x.options().dtype(acc_type_of(x.scalar_type()));
  const bool any_grad = need_x || need_w || need_b;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  at::Tensor logits = at::mm(x, q.weight.t()).contiguous();  // (N, C), x's dtype

  // The residual R = dloss/dlogits (N, C) in acc_t, divided by the mean denominator for
  // mean/sum (unscaled for none). The loss: per row (none) or per-block partials (mean/sum).
  at::Tensor R = any_grad ? at::empty({N, C}, acc_opts) : at::Tensor();
  acc_t* res = any_grad ? R.data_ptr<acc_t>() : nullptr;
  const int64_t grid = binary ? grid_for(N, kThreads) : grid_for(N, kWarps);
  at::Tensor loss, ws_loss;
  if (reduction == kNone) {
    loss = at::empty({N}, acc_opts);
  } else {
    ws_loss = at::empty({grid}, acc_opts);
  }
  // The fields the params of both row kernels have.
  auto set_common = [&](auto& rp) {
    rp.logits = logits.data_ptr<scalar_t>();
    rp.res = res;
    rp.loss_out = reduction == kNone ? loss.data_ptr<acc_t>() : nullptr;
    rp.ws_loss = reduction == kNone ? nullptr : ws_loss.data_ptr<acc_t>();
    rp.bias = opt_data<acc_t>(q.bias_acc);
    rp.N = N;
  };

  // The mean denominator: N (binary) or on the device (cross entropy: den_ws partials).
  acc_t host_den = acc_t(1);
  at::Tensor den_ws;
  if (binary) {
    BceRowsParams<scalar_t, acc_t> rp{};
    set_common(rp);
    rp.target = q.ftarget.data_ptr<scalar_t>();
    rp.pos_weight = opt_data<acc_t>(q.pw_acc);
    rp.sw = opt_data<scalar_t>(q.sw);
    if (reduction == kMean) host_den = static_cast<acc_t>(N);
    rp.den = host_den;
    bce_rows_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(rp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    CeRowsParams<scalar_t, acc_t> rp{};
    set_common(rp);
    rp.target = q.itarget.data_ptr<int64_t>();
    rp.cw = opt_data<acc_t>(q.cw_acc);
    rp.host_den = host_den;
    rp.C = C;
    rp.ignore_index = ignore_index;
    rp.eps = static_cast<acc_t>(label_smoothing);
    if (reduction == kMean) {
      den_ws = at::empty({grid}, acc_opts);
      launch_ce_den_partial(rp.target, rp.cw, N, C, ignore_index, den_ws.data_ptr<acc_t>(), grid,
                            stream);
      rp.den_ws = den_ws.data_ptr<acc_t>();
      rp.n_den = grid;
    }
    launch_ce_rows(rp, grid, stream);
  }

  if (reduction == kNone) {
    return {loss, empty0(acc_opts), empty0(acc_opts), any_grad ? R : empty0(acc_opts)};
  }

  loss = at::empty({}, acc_opts);
  FinalizeParams<acc_t> fp{};
  fp.ws_loss = ws_loss.data_ptr<acc_t>();
  fp.den_ws = den_ws.defined() ? den_ws.data_ptr<acc_t>() : nullptr;
  fp.n_den = den_ws.defined() ? grid : 0;
  fp.host_den = host_den;
  fp.loss_out = loss.data_ptr<acc_t>();
  fp.B = grid;
  fp.D = q.D;
  fp.nb = C;
  launch_finalize(fp, 1, stream);

  // grad_W = R^T x through cuBLAS (x read a second time on this path), grad_b = R.sum(0) in
  // acc_t; both returned in acc_t (csrc/contracts/losses.h). R itself is the residual for dX.
  at::Tensor gw =
      need_w ? at::mm(R.to(x.scalar_type()).t(), x).to(acc_opts.dtype()) : empty0(acc_opts);
  at::Tensor gb = need_b ? R.sum(0) : empty0(acc_opts);
  return {loss, gw, gb, need_x ? R : empty0(acc_opts)};
}

#define ML_INSTANTIATE_GEMM(scalar_t)                                                        \
  template LossOut gemm_path<scalar_t>(const Prepared&, bool, int64_t, double, int64_t, bool, \
                                       bool, bool);
ML_INSTANTIATE_GEMM(float)
ML_INSTANTIATE_GEMM(double)
ML_INSTANTIATE_GEMM(at::Half)
ML_INSTANTIATE_GEMM(at::BFloat16)
#undef ML_INSTANTIATE_GEMM

// The cross-entropy row kernel: res_t acc_t for path 2 (float and double are both callers'),
// res_t scalar_t for the chunked CE's in-place residual.
#define ML_INSTANTIATE_CE_ROWS(scalar_t, res_t)                                             \
  template void launch_ce_rows<scalar_t, res_t>(const CeRowsParams<scalar_t, res_t>&, int64_t, \
                                                cudaStream_t);
ML_INSTANTIATE_CE_ROWS(float, float)
ML_INSTANTIATE_CE_ROWS(double, double)
ML_INSTANTIATE_CE_ROWS(at::Half, float)
ML_INSTANTIATE_CE_ROWS(at::BFloat16, float)
ML_INSTANTIATE_CE_ROWS(at::Half, at::Half)
ML_INSTANTIATE_CE_ROWS(at::BFloat16, at::BFloat16)
#undef ML_INSTANTIATE_CE_ROWS

#endif  // ML_CUDA_HOST_EMU

}  // namespace cuda_logreg
}  // namespace manual_layers
