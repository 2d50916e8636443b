// Argument checks of the public ops (csrc/autograd.cpp), made once per call before any kernel
// runs, the same on every device. The messages name the argument and the shapes in Python's
// spelling ("(8, 1)", "torch.float32"), and the checks raise the Python exception a user
// expects: TORCH_CHECK_TYPE -> TypeError, TORCH_CHECK_VALUE -> ValueError, TORCH_CHECK ->
// RuntimeError (device mismatches, as torch's own ops). The fake kernels in
// manual_layers/_ops.py mirror the shape checks with torch._check.
//
// The private kernel ops (_linear_fwd, ...) are called by the public ops' autograd kernels
// only; they keep the cheap checks that protect memory (check_linear_args in common.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

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

}  // namespace manual_layers
