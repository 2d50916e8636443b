// CUDA host side of the fused linear layer y = act(x W^T + b) (csrc/contracts/linear.h): the
// launchers, the ops _linear_fwd / _linear_bwd and their registration; the kernels are
// linear_kernels.cuh, the MLP backward's fused dgrad mlp_dgrad.cu.
//
// GEMMs run in cuBLASLt (fp32 / fp16 / bf16) with the epilogues it has:
//   forward   none      -> BIAS (or DEFAULT without bias)
//             relu      -> RELU_BIAS (RELU)
//             gelu_tanh -> fp16 / bf16 only: GELU_AUX_BIAS (GELU_AUX) when the pre-activation
//                          is saved and M % 8 == 0, else GELU_BIAS (GELU) when it is not saved
//             gelu, silu -> with MANUAL_LAYERS_CUTLASS=1 on an sm_90 GPU, fp16 / bf16, K and
//                          M multiples of 8: one CUTLASS kernel with the activation (and the
//                          pre-activation store) in its epilogue (csrc/cuda/experimental/linear_sm90.h)
//             others    -> BIAS (DEFAULT) writing the pre-activation, then one own
//                          vectorised elementwise kernel (or the row-wise softmax kernel)
//   backward  dX = G W            DEFAULT
//             dW = G^T x          DEFAULT; BGRADB for the bias gradient of activation none (or
//                                 when the rows of G are not whole 16-byte vectors)
// where G = grad_out * act'(saved) comes from one own vectorised kernel (fp32 / fp64 math) that
// also sums G's columns for the bias gradient when it is wanted (act_bwd_colsum_kernel: per
// chunk of rows, then the chunks in order), so no pass over G is spent on the bias alone.
// The cuBLASLt GELU epilogue is the tanh approximation, so exact "gelu" never uses it; it is
// also not used for fp32, whose 1e-5 tolerance an undocumented epilogue accuracy may miss.
//
// Fallbacks (never an unwritten output): fp64, any GEMM dimension < 2, cuBLASLt disabled
// (MANUAL_LAYERS_DISABLE_CUBLASLT=1) or any cuBLASLt status other than success (also "no
// algorithm") -> at::addmm_out / at::mm_out (cuBLAS) plus the own epilogue kernels; a fused
// epilogue that fails is first retried as a plain BIAS / DEFAULT cuBLASLt GEMM. The bias
// gradient without BGRADB comes from a deterministic two-stage column-sum kernel (no atomics).
// A bias whose pointer is not 16-byte aligned is copied to fresh (aligned) memory first.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublasLt.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <string>
#include <tuple>
#include <utility>

#include "../../common.h"
#include "../../contracts/linear.h"
#include "../common/cublaslt.cuh"
#include "../common/cuda_common.cuh"
#include "linear_kernels.cuh"
#ifndef ML_CUDA_HOST_EMU
#include "../experimental/linear_sm90.h"
#endif

namespace manual_layers {
namespace {

using namespace cuda_common;

// The launchers and ops below are left out of the host emulation of tests/cuda_emu, which runs
// the kernels (linear_kernels.cuh) on the CPU.
#ifndef ML_CUDA_HOST_EMU

// =============================================================================================
// Launchers. All take contiguous tensors with numel > 0 on the current device / stream.
// =============================================================================================

template <typename T, Act A>
void launch_act_fwd(const at::Tensor& z, const at::Tensor& out) {
  constexpr int VEC = VecWidth<T>::value;
  const int64_t n = z.numel();
  const int64_t blocks = grid_for(ceil_div(n, VEC));
  act_fwd_kernel<T, A, VEC><<<static_cast<unsigned>(blocks), kThreads, 0,
                              at::cuda::getCurrentCUDAStream()>>>(
      z.const_data_ptr<T>(), out.mutable_data_ptr<T>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_column_tiles(int64_t gx, int64_t cols) {
  TORCH_CHECK(gx <= std::numeric_limits<int32_t>::max(), "linear_bwd: too many output features (",
              cols, ") for the bias-gradient kernel");
}

// G = g * act'(s); with bias_grad defined also bias_grad = column sums of G in the same pass
// (act_bwd_colsum_kernel, about two waves of 8 blocks per SM, then colsum_final_kernel).
template <typename T, Act A>
void launch_act_bwd(const at::Tensor& g, const at::Tensor& s, const at::Tensor& G,
                    const at::Tensor& bias_grad) {
  constexpr int VEC = VecWidth<T>::value;
  if (bias_grad.defined()) {
    using acc_t = at::opmath_type<T>;
    const int64_t rows = g.size(0), cols = g.size(1);
    const int64_t gx = ceil_div(cols, 32 * VEC);
    check_column_tiles(gx, cols);
    const auto [chunks, rows_per_chunk] = column_chunks(rows, gx, 16 * num_sms(), kFuseRows);
    const at::Tensor partial =
        at::empty({chunks, cols}, g.options().dtype(acc_type_of(g.scalar_type())));
    cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    act_bwd_colsum_kernel<T, A, VEC>
        <<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(chunks)), dim3(32, kFuseRows),
           0, stream>>>(g.const_data_ptr<T>(), s.const_data_ptr<T>(), G.mutable_data_ptr<T>(),
                        partial.mutable_data_ptr<acc_t>(), rows, cols, rows_per_chunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    colsum_final_kernel<T><<<static_cast<unsigned>(grid_for(cols)), kThreads, 0, stream>>>(
        partial.const_data_ptr<acc_t>(), bias_grad.mutable_data_ptr<T>(), chunks, cols);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int64_t n = g.numel();
  const int64_t blocks = grid_for(ceil_div(n, VEC));
  act_bwd_kernel<T, A, VEC><<<static_cast<unsigned>(blocks), kThreads, 0,
                              at::cuda::getCurrentCUDAStream()>>>(
      g.const_data_ptr<T>(), s.const_data_ptr<T>(), G.mutable_data_ptr<T>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// out = act(z), z and out (N, M) contiguous, 16-byte aligned, possibly the same tensor.
void apply_act_fwd(Act act, const at::Tensor& z, const at::Tensor& out) {
  if (act == Act::None) {
    if (!z.is_same(out)) out.copy_(z);
    return;
  }
  const int64_t rows = z.size(0), cols = z.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "linear_fwd_act", [&] {
    switch (act) {
      case Act::Relu: launch_act_fwd<scalar_t, Act::Relu>(z, out); break;
      case Act::Gelu: launch_act_fwd<scalar_t, Act::Gelu>(z, out); break;
      case Act::GeluTanh: launch_act_fwd<scalar_t, Act::GeluTanh>(z, out); break;
      case Act::Silu: launch_act_fwd<scalar_t, Act::Silu>(z, out); break;
      case Act::Sigmoid: launch_act_fwd<scalar_t, Act::Sigmoid>(z, out); break;
      case Act::Tanh: launch_act_fwd<scalar_t, Act::Tanh>(z, out); break;
      case Act::Softmax: {
        const int64_t blocks = grid_for(ceil_div(rows, kWarpsPerBlock), 1);
        softmax_fwd_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0,
                                       at::cuda::getCurrentCUDAStream()>>>(
            z.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), rows, cols);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        break;
      }
      default: TORCH_CHECK(false, "linear_fwd: unhandled activation");
    }
  });
}

// Whether apply_act_bwd can also produce the bias gradient of this problem: an elementwise
// activation and rows of whole 16-byte vectors.
bool act_bwd_colsum_ok(Act act, at::ScalarType dtype, int64_t cols) {
  if (act == Act::None || act == Act::Softmax) return false;
  const int64_t vec = 16 / static_cast<int64_t>(c10::elementSize(dtype));
  return cols % vec == 0;
}

// G = g * act'(s) (softmax: row-wise), all (N, M) contiguous and 16-byte aligned, N >= 1; with
// bias_grad defined (only for act_bwd_colsum_ok problems) also bias_grad (M,) = the column sums
// of G, deterministic (the order depends on N, M and the device's SM count only).
void apply_act_bwd(Act act, const at::Tensor& g, const at::Tensor& s, const at::Tensor& G,
                   const at::Tensor& bias_grad = at::Tensor()) {
  TORCH_CHECK(!bias_grad.defined() || act_bwd_colsum_ok(act, g.scalar_type(), g.size(1)),
              "linear_bwd: no fused bias gradient for this activation / width");
  const int64_t rows = g.size(0), cols = g.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "linear_bwd_act", [&] {
    const at::Tensor& b = bias_grad;
    switch (act) {
      case Act::Relu: launch_act_bwd<scalar_t, Act::Relu>(g, s, G, b); break;
      case Act::Gelu: launch_act_bwd<scalar_t, Act::Gelu>(g, s, G, b); break;
      case Act::GeluTanh: launch_act_bwd<scalar_t, Act::GeluTanh>(g, s, G, b); break;
      case Act::Silu: launch_act_bwd<scalar_t, Act::Silu>(g, s, G, b); break;
      case Act::Sigmoid: launch_act_bwd<scalar_t, Act::Sigmoid>(g, s, G, b); break;
      case Act::Tanh: launch_act_bwd<scalar_t, Act::Tanh>(g, s, G, b); break;
      case Act::Softmax: {
        const int64_t blocks = grid_for(ceil_div(rows, kWarpsPerBlock), 1);
        softmax_bwd_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0,
                                       at::cuda::getCurrentCUDAStream()>>>(
            g.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(),
            G.mutable_data_ptr<scalar_t>(), rows, cols);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        break;
      }
      default: TORCH_CHECK(false, "linear_bwd: unhandled activation");
    }
  });
}

// out (M,) = column sums of G (N, M), N >= 1, M >= 1; deterministic (fixed reduction order,
// which depends only on N and M).
void column_sum(const at::Tensor& G, const at::Tensor& out) {
  const int64_t rows = G.size(0), cols = G.size(1);
  const int64_t gx = ceil_div(cols, kColTileX);
  check_column_tiles(gx, cols);
  // About 1024 blocks in all, each chunk at least 32 rows.
  int64_t chunks, rows_per_chunk;
  std::tie(chunks, rows_per_chunk) = column_chunks(rows, gx, 1024, 32);
  const at::Tensor partial =
      at::empty({chunks, cols}, G.options().dtype(at::toOpMathType(G.scalar_type())));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, G.scalar_type(), "linear_bwd_colsum", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    colsum_partial_kernel<scalar_t>
        <<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(chunks)),
           dim3(kColTileX, kColTileY), 0, stream>>>(G.const_data_ptr<scalar_t>(),
                                                    partial.mutable_data_ptr<acc_t>(), rows, cols,
                                                    rows_per_chunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    colsum_final_kernel<scalar_t><<<static_cast<unsigned>(grid_for(cols)), kThreads, 0, stream>>>(
        partial.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(), chunks, cols);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

bool lt_ok(cublasStatus_t s) { return s == CUBLAS_STATUS_SUCCESS; }

#endif  // ML_CUDA_HOST_EMU

}  // namespace

#ifndef ML_CUDA_HOST_EMU

// =============================================================================================
// Ops
// =============================================================================================

std::tuple<at::Tensor, at::Tensor> linear_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                   const c10::optional<at::Tensor>& bias,
                                                   c10::string_view activation, bool save_pre) {
  check_linear_args("linear_fwd", x, weight, bias);
  TORCH_CHECK(x.is_cuda(), "linear_fwd: x must be a CUDA tensor here, got ", x.device());
  const Act act = parse_activation(std::string(activation.data(), activation.size()));
  c10::cuda::CUDAGuard guard(x.device());

  const int64_t N = x.size(0), K = x.size(1), M = weight.size(0);
  const bool has_bias = bias.has_value() && bias->defined();
  const bool keep_pre = save_pre && saved_for(act) == Saved::Pre;
  const at::Tensor out = at::empty({N, M}, x.options());
  const at::Tensor pre = keep_pre ? at::empty({N, M}, x.options()) : at::empty({0}, x.options());
  if (N == 0 || M == 0) return {out, pre};

  // 16-byte aligned contiguous bias (cuBLASLt epilogue pointers fault when under-aligned).
  const at::Tensor b = has_bias ? aligned_contiguous(*bias) : at::Tensor();
  // z: where the pre-activation goes (pre when kept, else out, activated in place).
  const at::Tensor& z = keep_pre ? pre : out;
  bool act_done = false;  // out already holds act(z)

  if (K == 0) {
    if (has_bias) {
      z.copy_(b.unsqueeze(0).expand({N, M}));
    } else {
      z.zero_();
    }
  } else {
    const at::Tensor xc = x.contiguous();
    const at::Tensor wc = weight.contiguous();
    bool gemm_done = false;
    // 0. GELU / SiLU with the pre-activation store in one sm_90 CUTLASS kernel (opt-in).
    if ((act == Act::Gelu || act == Act::Silu) && sm90_cutlass_enabled()) {
      const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
      if (prop->major == 9 && prop->minor == 0) {
        gemm_done = sm90::linear_act_fwd(
            x.scalar_type(), act, xc.const_data_ptr(), wc.const_data_ptr(),
            has_bias ? b.const_data_ptr() : nullptr, out.mutable_data_ptr(),
            keep_pre ? pre.mutable_data_ptr() : nullptr, N, M, K, x.get_device(),
            prop->multiProcessorCount, at::cuda::getCurrentCUDAStream());
        act_done = gemm_done;
      }
    }
    cudaDataType_t dt = CUDA_R_32F;
    if (!gemm_done && lt_dtype(x.scalar_type(), &dt) && lt_shape_ok(M, N, K)) {
      // y^T (M x N, ld M) = W^T (op T of col-major K x M, ld K) . x^T (col-major K x N, ld K)
      // (D is set below, per epilogue.)
      LtGemm g = lt_gemm(CUBLAS_OP_T, CUBLAS_OP_N, M, N, K, wc.const_data_ptr(), K,
                         xc.const_data_ptr(), K, nullptr, M, dt, lt_compute_type(x.scalar_type()));
      g.bias = has_bias ? const_cast<void*>(b.const_data_ptr()) : nullptr;
      const bool half_like = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;

      // 1. The activation fused into the GEMM, where cuBLASLt has it.
      bool fused = false;
      if (act == Act::Relu) {
        g.epilogue = has_bias ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_RELU;
        g.D = out.mutable_data_ptr();
        fused = true;
      } else if (act == Act::GeluTanh && half_like) {
        if (!keep_pre) {
          g.epilogue = has_bias ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_GELU;
          g.D = out.mutable_data_ptr();
          fused = true;
        } else if (M % 8 == 0) {
          g.epilogue = has_bias ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
          g.D = out.mutable_data_ptr();
          g.aux = pre.mutable_data_ptr();
          g.aux_ld = M;
          fused = true;
        }
      }
      if (fused && lt_ok(lt_matmul(g, x.options()))) {
        gemm_done = true;
        act_done = true;
      }
      // 2. Plain GEMM (+ bias) writing the pre-activation.
      if (!gemm_done) {
        g.epilogue = has_bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
        g.D = z.mutable_data_ptr();
        g.aux = nullptr;
        g.aux_ld = 0;
        gemm_done = lt_ok(lt_matmul(g, x.options()));
      }
    }
    // 3. cuBLAS through ATen.
    if (!gemm_done) {
      at::Tensor zz = z;  // the _out ops take a non-const reference
      if (has_bias) {
        at::addmm_out(zz, b, xc, wc.t());
      } else {
        at::mm_out(zz, xc, wc.t());
      }
    }
  }

  if (!act_done && act != Act::None) apply_act_fwd(act, z, out);
  return {out, pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& saved, c10::string_view activation, bool need_x, bool need_weight,
    bool need_bias) {
  check_linear_args("linear_bwd", x, weight, c10::nullopt);
  TORCH_CHECK(x.is_cuda(), "linear_bwd: x must be a CUDA tensor here, got ", x.device());
  const Act act = parse_activation(std::string(activation.data(), activation.size()));
  const int64_t N = x.size(0), K = x.size(1), M = weight.size(0);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == N && grad_out.size(1) == M,
              "linear_bwd: grad_out must have shape (", N, ", ", M, "), got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "linear_bwd: grad_out dtype ",
              grad_out.scalar_type(), " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(grad_out.device() == x.device(), "linear_bwd: grad_out is on ", grad_out.device(),
              " but x is on ", x.device());
  if (act != Act::None) {
    TORCH_CHECK(saved.dim() == 2 && saved.size(0) == N && saved.size(1) == M,
                "linear_bwd: saved (the ", saved_for(act) == Saved::Pre ? "pre-activation" : "output",
                " for activation '", std::string(activation.data(), activation.size()),
                "') must have shape (", N, ", ", M, "), got ", saved.sizes());
    TORCH_CHECK(saved.scalar_type() == x.scalar_type(), "linear_bwd: saved dtype ",
                saved.scalar_type(), " differs from x dtype ", x.scalar_type());
    TORCH_CHECK(saved.device() == x.device(), "linear_bwd: saved is on ", saved.device(),
                " but x is on ", x.device());
  }
  c10::cuda::CUDAGuard guard(x.device());

  const at::Tensor grad_x = need_x ? at::empty({N, K}, x.options()) : at::empty({0}, x.options());
  const at::Tensor grad_w =
      need_weight ? at::empty({M, K}, x.options()) : at::empty({0}, x.options());
  const at::Tensor grad_b = need_bias ? at::empty({M}, x.options()) : at::empty({0}, x.options());
  if (!need_x && !need_weight && !need_bias) return {grad_x, grad_w, grad_b};

  if (N == 0) {  // sums over an empty batch
    if (need_weight) grad_w.zero_();
    if (need_bias) grad_b.zero_();
    return {grad_x, grad_w, grad_b};
  }
  if (M == 0) {  // no output features: grad_x is a sum over nothing
    if (need_x) grad_x.zero_();
    return {grad_x, grad_w, grad_b};
  }

  // G = grad_out * act'(saved), (N, M) contiguous and 16-byte aligned.
  const at::Tensor g = aligned_contiguous(grad_out);
  // With the bias gradient wanted, one pass writes G and the bias gradient's column partials
  // (act_bwd_colsum_kernel): the dW GEMM then needs no BGRADB epilogue, which on sm_90 is a
  // separate cuBLASLt kernel reading G again (globalKernelBgradAB_v2 in the H100 profile,
  // docs/perf-h100-2026-11-28.md; figure in docs/perf-notes-from-code.md).
  at::Tensor G;
  bool bias_done = false;
  if (act == Act::None) {
    G = g;
  } else {
    const at::Tensor s = aligned_contiguous(saved);
    G = at::empty({N, M}, x.options());
    bias_done = need_bias && act_bwd_colsum_ok(act, x.scalar_type(), M);
    apply_act_bwd(act, g, s, G, bias_done ? grad_b : at::Tensor());
  }

  if (K > 0 && (need_x || need_weight)) {
    const at::Tensor xc = x.contiguous();
    const at::Tensor wc = weight.contiguous();
    cudaDataType_t dt = CUDA_R_32F;
    const bool lt_type = lt_dtype(x.scalar_type(), &dt);
    const cublasComputeType_t ct = lt_compute_type(x.scalar_type());

    if (need_x) {
      bool ok = false;
      if (lt_type && lt_shape_ok(K, N, M)) {
        // dX^T (K x N, ld K) = W^T (col-major K x M, ld K) . G^T (col-major M x N, ld M)
        LtGemm gm = lt_gemm(CUBLAS_OP_N, CUBLAS_OP_N, K, N, M, wc.const_data_ptr(), K,
                            G.const_data_ptr(), M, grad_x.mutable_data_ptr(), K, dt, ct);
        ok = lt_ok(lt_matmul(gm, x.options()));
      }
      if (!ok) {
        at::Tensor gx = grad_x;
        at::mm_out(gx, G, wc);
      }
    }

    if (need_weight) {
      bool ok = false;
      if (lt_type && lt_shape_ok(K, M, N)) {
        // dW^T (K x M, ld K) = x^T (col-major K x N, ld K) . G (op T of col-major M x N, ld M);
        // BGRADB: grad_b (length M = columns of D) = sums of op(B) = G over k = N.
        LtGemm gm = lt_gemm(CUBLAS_OP_N, CUBLAS_OP_T, K, M, N, xc.const_data_ptr(), K,
                            G.const_data_ptr(), M, grad_w.mutable_data_ptr(), K, dt, ct);
        if (need_bias && !bias_done) {
          gm.epilogue = CUBLASLT_EPILOGUE_BGRADB;
          gm.bias = grad_b.mutable_data_ptr();
          ok = lt_ok(lt_matmul(gm, x.options()));
          bias_done = ok;
        }
        if (!ok) {
          gm.epilogue = CUBLASLT_EPILOGUE_DEFAULT;
          gm.bias = nullptr;
          ok = lt_ok(lt_matmul(gm, x.options()));
        }
      }
      if (!ok) {
        at::Tensor gw = grad_w;
        at::mm_out(gw, G.t(), xc);
      }
    }
  }

  if (need_bias && !bias_done) column_sum(G, grad_b);
  return {grad_x, grad_w, grad_b};
}
#endif  // ML_CUDA_HOST_EMU

}  // namespace manual_layers

#ifndef ML_CUDA_HOST_EMU
TORCH_LIBRARY_IMPL(manual_layers, CUDA, m) {
  m.impl("_linear_fwd", &manual_layers::linear_fwd_cuda);
  m.impl("_linear_bwd", &manual_layers::linear_bwd_cuda);
}
#endif  // ML_CUDA_HOST_EMU
