// Shared by the CPU and CUDA kernels: activation and reduction codes, argument checks.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

namespace manual_layers {

// at::empty for an output about to be written whole. CPU outputs of 8 MiB and more reuse the
// memory of a freed output of the same size (new buffers get the huge-page advice); any other
// tensor is plain at::empty. csrc/cpu/runtime/alloc.cpp says why.
at::Tensor empty_for_write(at::IntArrayRef sizes, const at::TensorOptions& options);

// The kernels' GEMMs: at::mm / mm_out / addmm / addmm_out, except that fp16 on a CPU without a
// native fp16 GEMM runs as an fp32 GEMM rounded once (csrc/cpu/runtime/gemm.cpp says why). Any device.
namespace gemm {
// Whether these functions multiply a's dtype by widening it to fp32 (fp16 on a CPU without a
// native fp16 GEMM): callers that run many GEMMs on one operand can widen it once themselves.
bool widens(const at::Tensor& a);
// Whether a is a CPU bf16 / fp16 tensor whose GEMMs oneDNN runs in that type on this CPU (its
// 16-bit dot-product or AMX instructions), faster than fp32.
bool native_16bit(const at::Tensor& a);
at::Tensor mm(const at::Tensor& a, const at::Tensor& b);
at::Tensor& mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b);
at::Tensor addmm(const at::Tensor& bias, const at::Tensor& a, const at::Tensor& b);
at::Tensor& addmm_out(at::Tensor& out, const at::Tensor& bias, const at::Tensor& a,
                      const at::Tensor& b);
}  // namespace gemm

// Activations of the fused linear layer. The string names are the public API
// (manual_layers.Linear(activation=...)); "softmax" is internal, used by
// logistic_regression() for the multinomial probabilities (a row-wise epilogue).
enum class Act : int { None = 0, Relu, Gelu, GeluTanh, Silu, Sigmoid, Tanh, Softmax };

inline Act parse_activation(const std::string& name) {
  if (name == "none" || name.empty()) return Act::None;
  if (name == "relu") return Act::Relu;
  if (name == "gelu") return Act::Gelu;
  if (name == "gelu_tanh") return Act::GeluTanh;
  if (name == "silu") return Act::Silu;
  if (name == "sigmoid") return Act::Sigmoid;
  if (name == "tanh") return Act::Tanh;
  if (name == "softmax") return Act::Softmax;
  TORCH_CHECK_VALUE(false, "manual_layers: unknown activation '", name,
                    "'; expected one of none, relu, gelu, gelu_tanh, silu, sigmoid, tanh");
}

// What backward needs saved for an activation's derivative:
//  - None: nothing;
//  - Relu, Sigmoid, Tanh, Softmax: the output y (relu' = y > 0, sigmoid' = y(1-y),
//    tanh' = 1-y^2, softmax' = y*(g - sum(g*y)));
//  - Gelu, GeluTanh, Silu: the pre-activation z = x W^T + b.
enum class Saved : int { Nothing = 0, Output, Pre };

inline Saved saved_for(Act a) {
  switch (a) {
    case Act::None: return Saved::Nothing;
    case Act::Gelu:
    case Act::GeluTanh:
    case Act::Silu: return Saved::Pre;
    default: return Saved::Output;
  }
}

// Loss reductions, same numbering as torch's at::Reduction.
enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

inline void check_reduction(int64_t r) {
  TORCH_CHECK_VALUE(r == kNone || r == kMean || r == kSum,
                    "manual_layers: reduction code must be 0 (none), 1 (mean) or 2 (sum), got ", r);
}

// Checks shared by every linear-family kernel: x is (N, K), weight (M, K), bias (M,)
// or undefined, all on one device and of one floating dtype.
inline void check_linear_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (N, in_features), got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D (out_features, in_features), got shape ",
              weight.sizes());
  TORCH_CHECK(x.size(1) == weight.size(1), op, ": x has ", x.size(1),
              " features but weight has in_features ", weight.size(1), " (x ", x.sizes(),
              ", weight ", weight.sizes(), ")");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be a floating tensor, got ",
              x.scalar_type());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), op, ": x and weight must have one dtype, got ",
              x.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(x.device() == weight.device(), op, ": x and weight must be on one device, got ",
              x.device(), " and ", weight.device());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op,
                ": bias must have shape (", weight.size(0), ",), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias dtype ", bias->scalar_type(),
                " differs from x dtype ", x.scalar_type());
    TORCH_CHECK(bias->device() == x.device(), op, ": bias is on ", bias->device(), " but x is on ",
                x.device());
  }
}

}  // namespace manual_layers
