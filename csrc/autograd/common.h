// What the Autograd and Autocast kernels of the public ops (csrc/autograd/*.cpp) share.
//
// Each public op (linear, mlp, linear_bce, linear_ce) has, in the file of its family:
//  - an Autograd kernel: checks the arguments once (csrc/checks.h), flattens the leading
//    dimensions (x (..., K) -> (N, K), a view where strides allow), reads GradMode and
//    requires_grad to decide what to compute and save, and runs a torch::autograd::Function whose
//    forward and backward call the private kernel ops below autograd through typed dispatcher
//    handles: one dispatcher call forward, one graph node backward, and a torch.export graph that
//    holds the public op trains in grad mode;
//  - a CPU and a CUDA kernel for calls without autograd (inference mode, the functionalized
//    graphs of torch.compile / torch.export): the same checks and forward;
//  - Autocast kernels (CPU, CUDA), cast as torch casts F.linear and F.cross_entropy, so a direct
//    torch.ops call, torch.compile and an exported graph are autocast alike.
//
// Double backward: a Function's backward runs the hand-written kernels, whose outputs carry no
// graph. When a graph of the backward is wanted (create_graph=True and an input of the
// backward requires grad), it calls the op's _*_backward_graph op instead: the same derivative
// in differentiable PyTorch ops (manual_layers/_derivatives.py registers them). Every Function
// therefore keeps its inputs saved.
//
// Sizes stay symbolic (sym_size, reshape_symint): torch.export with a dynamic batch dimension
// and torch.compile(dynamic=True) trace these kernels once for every size.
#pragma once

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include <initializer_list>
#include <vector>

#include "../common.h"

namespace manual_layers {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// fn(): the typed handle of the op manual_layers::<name>, looked up once.
#define ML_OP_HANDLE(fn, name, Sig)                                                      \
  inline const c10::TypedOperatorHandle<Sig>& fn() {                                   \
    static const auto h =                                                               \
        c10::Dispatcher::singleton().findSchemaOrThrow("manual_layers::" name, "")      \
            .typed<Sig>();                                                              \
    return h;                                                                           \
  }

using Grads3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

inline c10::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}
inline at::Tensor undef() { return at::Tensor(); }
inline at::Tensor value_or_undef(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? *t : at::Tensor();
}

// (..., K) -> (N, K); a 1-D x is one row. Symbolic sizes stay symbolic.
inline at::Tensor flatten_rows(const at::Tensor& x) {
  if (x.dim() == 2) return x;
  c10::SymInt n = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) n = n * x.sym_size(d);
  return x.reshape_symint({n, x.sym_size(-1)});
}

// (N, M) -> (..., M) with x's leading dims.
inline at::Tensor unflatten_rows(const at::Tensor& out, const at::Tensor& x) {
  if (x.dim() == 2) return out;
  std::vector<c10::SymInt> shape(x.sym_sizes().begin(), x.sym_sizes().end() - 1);
  shape.push_back(out.sym_size(-1));
  return out.reshape_symint(shape);
}

// Whether a backward must be built from differentiable ops: create_graph=True and an input
// of the backward (grad_output, a saved input) requires grad.
inline bool backward_needs_graph(std::initializer_list<at::Tensor> tensors) {
  if (!at::GradMode::is_enabled()) return false;
  for (const auto& t : tensors)
    if (t.defined() && t.requires_grad()) return true;
  return false;
}

// The gradients a Function returns for its first three inputs (x, weight, bias), undefined
// where not needed, then `rest` undefined entries for its other inputs.
inline variable_list grads_out(const Grads3& g, const std::vector<bool>& need, size_t rest) {
  variable_list out{need[0] ? std::get<0>(g) : undef(), need[1] ? std::get<1>(g) : undef(),
                    need[2] ? std::get<2>(g) : undef()};
  out.resize(3 + rest);
  return out;
}

// Traced tensors (FakeTensor / functional tensors of torch.compile and torch.export) or
// symbolic sizes: no real memory may be allocated for them.
inline bool is_traced(const at::Tensor& t) {
  const auto traced =
      c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize});
  return t.key_set().has_any(traced) || t.unsafeGetTensorImpl()->has_symbolic_sizes_strides();
}

// An output about to be written whole, shaped like t: the CPU output cache's memory for real
// tensors (empty_for_write), a plain empty_like under tracing.
inline at::Tensor empty_output_like(const at::Tensor& t) {
  if (is_traced(t)) return at::empty_like(t, at::MemoryFormat::Contiguous);
  return empty_for_write(t.sizes(), t.options());
}

// Autocast: casts eligible floating tensors (not float64) to the autocast dtype of `device`,
// through autocast's weight cache, as torch's own autocast kernels do.
template <c10::DeviceType device>
struct Autocast {
  c10::impl::ExcludeDispatchKeyGuard no_autocast{
      at::autocast::get_autocast_dispatch_key_from_device_type(device)};
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device);
  at::Tensor operator()(const at::Tensor& t) const {
    return at::autocast::cached_cast(dtype, t, device);
  }
  c10::optional<at::Tensor> operator()(const c10::optional<at::Tensor>& t) const {
    return at::autocast::cached_cast(dtype, t, device);
  }
};

}  // namespace manual_layers
