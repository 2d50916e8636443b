// Argument checks, once for every device.
//
// The public ops (csrc/autograd/*.cpp) check their arguments once per call before any kernel
// runs. The messages name the argument and the shapes in Python's spelling ("(8, 1)",
// "torch.float32"), and the checks raise the Python exception a user expects:
// TORCH_CHECK_TYPE -> TypeError, TORCH_CHECK_VALUE -> ValueError, TORCH_CHECK -> RuntimeError
// (device mismatches, as torch's own ops). The fake kernels in manual_layers/_ops.py mirror the
// shape checks with torch._check.
//
// The private kernel ops (_linear_fwd, _linear_bce_fwd, ...) are called by the public ops'
// autograd kernels and by the fit; they keep the cheap checks that protect memory and the
// kernels' assumptions: check_linear_args in common.h, and the loss arguments' checks at the end
// of this file, one set that the CPU and the CUDA kernels of an op both call (same messages,
// RuntimeError).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cstdint>

#include <sstream>
#include <string>

namespace manual_layers {

// (2, 3), (4,), () as Python prints a torch.Size.
inline std::string py_shape(at::IntArrayRef s) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  if (s.size() == 1) o << ",";
  o << ")";
  return o.str();
}

// torch.float32, torch.int64, ... as Python prints a dtype.
inline std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t);
  }
}

inline bool has(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// x (..., in_features), weight (out_features, in_features), bias (out_features,) or None: one
// floating dtype, one device.
inline void check_linear_public(const char* fn, const at::Tensor& x, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), fn,
                   ": x must be a floating-point tensor, got dtype ", py_dtype(x.scalar_type()));
  TORCH_CHECK_VALUE(x.dim() >= 1, fn,
                    ": x must have at least one dimension (..., in_features), got a 0-d tensor");
  TORCH_CHECK_VALUE(weight.dim() == 2, fn,
                    ": weight must be 2-D (out_features, in_features), got shape ",
                    py_shape(weight.sizes()));
  // sym_size: a plain size() of a traced tensor with symbolic sizes would specialise every one
  // of them (torch.export with a dynamic batch, torch.compile(dynamic=True)).
  TORCH_CHECK_VALUE(x.sym_size(-1) == weight.sym_size(1), fn, ": x has ", x.size(-1),
                    " features (x.shape=", py_shape(x.sizes()),
                    ") but weight expects in_features=", weight.size(1),
                    " (weight.shape=", py_shape(weight.sizes()), ")");
  if (has(bias)) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), fn,
                      ": bias must have shape (", weight.size(0), ",) to match weight.shape=",
                      py_shape(weight.sizes()), ", got ", py_shape(bias->sizes()));
  }
  const at::Tensor* others[2] = {&weight, has(bias) ? &*bias : nullptr};
  const char* names[2] = {"weight", "bias"};
  for (int k = 0; k < 2; ++k) {
    if (others[k] == nullptr) continue;
    const at::Tensor& t = *others[k];
    TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), fn, ": x and ", names[k],
                     " must have the same dtype, got x.dtype=", py_dtype(x.scalar_type()),
                     " and ", names[k], ".dtype=", py_dtype(t.scalar_type()));
    TORCH_CHECK(t.device() == x.device(), fn, ": x and ", names[k],
                " must be on the same device, got x on ", x.device(), " and ", names[k], " on ",
                t.device());
  }
}

// An extra tensor argument of a loss (target, weights) must be on x's device.
inline void check_same_device(const char* fn, const char* name, const at::Tensor& t,
                              const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), fn, ": ", name, " is on ", t.device(), " but x is on ",
              x.device());
}

// Gradients with respect to targets and loss weights are not computed: refuse them instead of
// returning none silently (only when autograd would record).
inline void check_no_grad(const char* fn, const char* name, const c10::optional<at::Tensor>& t,
                          bool grad_mode) {
  TORCH_CHECK_VALUE(!(grad_mode && has(t) && t->requires_grad()), fn,
                    ": gradients with respect to ", name,
                    " are not supported by the fused kernel; pass ", name, ".detach()");
}

inline void check_loss_reduction(const char* fn, int64_t r) {
  TORCH_CHECK_VALUE(r == 0 || r == 1 || r == 2, fn,
                    ": reduction must be 'none', 'mean' or 'sum' (codes 0, 1, 2), got ", r);
}

// ---- The private loss kernels' checks (CPU and CUDA alike; RuntimeError) -----------------------

// The private loss kernels' names in their messages, the same on every device.
inline constexpr const char* kBceKernelOp = "manual_layers._linear_bce_fwd";
inline constexpr const char* kCeKernelOp = "manual_layers._linear_ce_fwd";

// label_smoothing of the class-index cross entropy: in [0, 1].
inline void check_label_smoothing(const char* op, double label_smoothing) {
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
              ": label_smoothing must be between 0.0 and 1.0, got ", label_smoothing);
}

// class_weight: undefined, or a floating (C,) tensor on x's device.
inline void check_class_weight(const char* op, const c10::optional<at::Tensor>& class_weight,
                               const at::Tensor& x, int64_t C) {
  if (!has(class_weight)) return;
  TORCH_CHECK(class_weight->dim() == 1 && class_weight->size(0) == C, op,
              ": class_weight must have shape (", C, ",), got ", class_weight->sizes());
  check_same_device(op, "class_weight", *class_weight, x);
  TORCH_CHECK(at::isFloatingType(class_weight->scalar_type()), op,
              ": class_weight must be floating, got ", class_weight->scalar_type());
}

// Class-index targets of x's N rows: an int64 (N,) tensor on x's device.
inline void check_class_index_target(const char* op, const at::Tensor& target,
                                     const at::Tensor& x) {
  const int64_t N = x.size(0);
  TORCH_CHECK(target.dim() == 1 && target.size(0) == N, op, ": target must have shape (", N,
              ",), got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, op,
              ": target must hold int64 class indices, got ", target.scalar_type());
  check_same_device(op, "target", target, x);
}

// _linear_ce_fwd's arguments besides x, weight, bias (check_linear_args).
inline void check_ce_kernel_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                 const at::Tensor& target,
                                 const c10::optional<at::Tensor>& class_weight,
                                 double label_smoothing) {
  check_class_index_target(op, target, x);
  check_label_smoothing(op, label_smoothing);
  check_class_weight(op, class_weight, x, weight.size(0));
}

// _linear_bce_fwd's arguments besides x, weight, bias (check_linear_args): one output, target a
// floating (N,) tensor of probabilities (never converted from integers: the public op refuses
// those too), pos_weight one element, sample_weight (N,), all on x's device.
inline void check_bce_kernel_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                  const at::Tensor& target,
                                  const c10::optional<at::Tensor>& pos_weight,
                                  const c10::optional<at::Tensor>& sample_weight) {
  const int64_t N = x.size(0);
  TORCH_CHECK(weight.size(0) == 1, op, ": binary logistic regression needs weight of shape (1, ",
              x.size(1), "), got ", weight.sizes());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == N, op, ": target must have shape (", N,
              ",), got ", target.sizes());
  TORCH_CHECK(at::isFloatingType(target.scalar_type()), op,
              ": target must be a floating tensor of probabilities, got ", target.scalar_type());
  check_same_device(op, "target", target, x);
  if (has(pos_weight)) {
    TORCH_CHECK(pos_weight->numel() == 1, op, ": pos_weight must have one element, got shape ",
                pos_weight->sizes());
    check_same_device(op, "pos_weight", *pos_weight, x);
  }
  if (has(sample_weight)) {
    TORCH_CHECK(sample_weight->dim() == 1 && sample_weight->size(0) == N, op,
                ": sample_weight must have shape (", N, ",), got ", sample_weight->sizes());
    check_same_device(op, "sample_weight", *sample_weight, x);
  }
}

}  // namespace manual_layers
