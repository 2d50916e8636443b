// The public ops (linear, linear_bce, linear_ce) and their autograd, in C++.
//
// Each public op has
//  - an Autograd kernel: checks the arguments once (csrc/checks.h), reads GradMode and
//    requires_grad to decide what to compute and save, and runs a torch::autograd::Function
//    whose forward and backward call the private kernel ops (_linear_fwd, ...) below autograd
//    through typed dispatcher handles. One dispatcher call runs forward, one graph node runs
//    backward, and a torch.export graph that contains the public op trains in grad mode.
//  - a CPU and a CUDA kernel for calls that do not involve autograd (inference mode, the
//    functionalized graphs of torch.compile / torch.export): the same checks and forward.
// The backward of each Function refuses create_graph=True (double backward) with a clear error:
// the derivatives are hand-written kernels, not differentiable themselves.
//
// Leading dimensions are flattened here (x (..., K) -> (N, K), a view when x's strides allow),
// so the kernels see 2-D problems and callers any shape, as with nn.Linear.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ExpandUtils.h>
#include <ATen/OpMathType.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "checks.h"
#include "common.h"
#include "linear.h"
#include "logreg.h"
#include "mlp.h"

namespace manual_layers {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ---- typed handles of the private kernel ops ------------------------------------------------
using LinearFwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                        const c10::optional<at::Tensor>&,
                                                        c10::string_view, bool);
using LinearBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view,
    bool, bool, bool);
using BceFwdSig = LossOut(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                          const at::Tensor&, const c10::optional<at::Tensor>&,
                          const c10::optional<at::Tensor>&, int64_t, bool, bool, bool);
using CeFwdSig = LossOut(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                         const at::Tensor&, const c10::optional<at::Tensor>&, int64_t, double,
                         int64_t, bool, bool, bool);
using LossBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, int64_t, bool, bool, bool);

using CeChunkedBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
    const at::Tensor&, const c10::optional<at::Tensor>&, int64_t, double, bool, bool, bool);

using MlpBwdSig = MlpGrads(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           c10::string_view, bool, bool, bool, bool, bool);

template <typename Sig>
c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}
const c10::TypedOperatorHandle<LinearFwdSig>& linear_fwd_op() {
  static const auto h = handle<LinearFwdSig>("manual_layers::_linear_fwd");
  return h;
}
const c10::TypedOperatorHandle<LinearBwdSig>& linear_bwd_op() {
  static const auto h = handle<LinearBwdSig>("manual_layers::_linear_bwd");
  return h;
}
const c10::TypedOperatorHandle<BceFwdSig>& bce_fwd_op() {
  static const auto h = handle<BceFwdSig>("manual_layers::_linear_bce_fwd");
  return h;
}
const c10::TypedOperatorHandle<CeFwdSig>& ce_fwd_op() {
  static const auto h = handle<CeFwdSig>("manual_layers::_linear_ce_fwd");
  return h;
}
const c10::TypedOperatorHandle<LossBwdSig>& loss_bwd_op() {
  static const auto h = handle<LossBwdSig>("manual_layers::_linear_loss_bwd");
  return h;
}

const c10::TypedOperatorHandle<CeFwdSig>& ce_chunked_fwd_op() {
  static const auto h = handle<CeFwdSig>("manual_layers::_linear_ce_chunked_fwd");
  return h;
}
const c10::TypedOperatorHandle<CeChunkedBwdSig>& ce_chunked_bwd_op() {
  static const auto h = handle<CeChunkedBwdSig>("manual_layers::_linear_ce_chunked_bwd");
  return h;
}

const c10::TypedOperatorHandle<MlpBwdSig>& mlp_bwd_op() {
  static const auto h = handle<MlpBwdSig>("manual_layers::_mlp_bwd");
  return h;
}

c10::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}
at::Tensor undef() { return at::Tensor(); }

// (..., K) -> (N, K); a 1-D x is one row. reshape with an explicit N, so that K == 0 works.
at::Tensor flatten_rows(const at::Tensor& x) {
  if (x.dim() == 2) return x;
  const int64_t K = x.size(-1);
  int64_t N = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) N *= x.size(d);
  return x.reshape({N, K});
}

// (N, M) -> (..., M) with x's leading dims.
at::Tensor unflatten_rows(const at::Tensor& out, const at::Tensor& x) {
  if (x.dim() == 2) return out;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(out.size(-1));
  return out.reshape(shape);
}

[[noreturn]] void refuse_double_backward(const char* what) {
  TORCH_CHECK(false, "manual_layers: double backward (create_graph=True) through ", what,
              " is not supported: its backward is a hand-written kernel, not differentiable");
}

// ============================================================================================
// linear
// ============================================================================================

constexpr const char* kLinear = "manual_layers.functional.linear";

class LinearFn : public torch::autograd::Function<LinearFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, const std::string& activation,
                            bool need_x,
                            bool need_w, bool need_b) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, pre] = linear_fwd_op().call(x, weight, bias, activation, true);
    const Saved what = saved_for(parse_activation(activation));
    at::Tensor saved = what == Saved::Pre ? pre : (what == Saved::Output ? out : undef());
    ctx->save_for_backward({x, weight, saved});
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["need"] = std::vector<bool>{need_x, need_w, need_b};
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (at::GradMode::is_enabled()) refuse_double_backward("Linear");
    const auto saved = ctx->get_saved_variables();
    const auto need = ctx->saved_data["need"].toBoolList();
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    const at::Tensor& x = saved[0];
    at::Tensor s = saved[2].defined() ? saved[2] : at::empty({0}, x.options());
    at::Tensor g = grads[0];
    if (g.scalar_type() != x.scalar_type()) g = g.to(x.scalar_type());
    auto [gx, gw, gb] =
        linear_bwd_op().call(g, x, saved[1], s, activation, need[0], need[1], need[2]);
    return {need[0] ? gx : undef(), need[1] ? gw : undef(), need[2] ? gb : undef(), undef(),
            undef(), undef(), undef()};
  }
};

at::Tensor linear_autograd(const at::Tensor& x, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, c10::string_view activation) {
  const std::string act(activation);
  parse_activation(act);  // ValueError on an unknown name, before anything else
  check_linear_public(kLinear, x, weight, bias);
  const bool grad = at::GradMode::is_enabled();
  const bool nx = grad && x.requires_grad(), nw = grad && weight.requires_grad();
  const bool nb = grad && has(bias) && bias->requires_grad();
  const at::Tensor x2 = flatten_rows(x);
  at::Tensor out;
  if (nx || nw || nb) {
    out = LinearFn::apply(x2, weight, bias, act, nx, nw, nb);
  } else {
    at::AutoDispatchBelowADInplaceOrView below;
    out = std::get<0>(linear_fwd_op().call(x2, weight, bias, act, false));
  }
  return unflatten_rows(out, x);
}

// CPU / CUDA key: no autograd involved.
at::Tensor linear_plain(const at::Tensor& x, const at::Tensor& weight,
                        const c10::optional<at::Tensor>& bias, c10::string_view activation) {
  parse_activation(std::string(activation));
  check_linear_public(kLinear, x, weight, bias);
  const at::Tensor out = std::get<0>(linear_fwd_op().call(flatten_rows(x), weight, bias,
                                                          activation, false));
  return unflatten_rows(out, x);
}

// ============================================================================================
// mlp: Linear(w1, b1) -> activation -> Linear(w2, b2)
// ============================================================================================

constexpr const char* kMlp = "manual_layers.functional.mlp";

// Forward: _linear_fwd for the first layer with the activation (keeping what act' needs), then
// _linear_fwd for the second layer (activation none: one addmm). Backward: one _mlp_bwd.
class MlpFn : public torch::autograd::Function<MlpFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w1,
                            const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
                            const c10::optional<at::Tensor>& b2, const std::string& activation,
                            bool nx, bool nw1, bool nb1, bool nw2, bool nb2) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [h, pre] = linear_fwd_op().call(x, w1, b1, activation, true);
    at::Tensor y = std::get<0>(linear_fwd_op().call(h, w2, b2, "none", false));
    const Saved what = saved_for(parse_activation(activation));
    const bool first = nx || nw1 || nb1;
    // h: for dW2 = g^T h, and as act's saved output (relu, sigmoid, tanh) when the first layer
    // needs gradients; x: only for dW1.
    const bool keep_h = nw2 || (first && what == Saved::Output);
    ctx->save_for_backward({nw1 ? x : undef(), w1, w2, keep_h ? h : undef(),
                            first && what == Saved::Pre ? pre : undef()});
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["need"] = std::vector<bool>{nx, nw1, nb1, nw2, nb2};
    ctx->saved_data["shape"] = std::vector<int64_t>{x.size(0), x.size(1), w1.size(0)};
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (at::GradMode::is_enabled()) refuse_double_backward("MLP");
    const auto s = ctx->get_saved_variables();
    const auto need = ctx->saved_data["need"].toBoolList();
    const auto shape = ctx->saved_data["shape"].toIntVector();
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    const at::Tensor& w1 = s[1];
    // Placeholders of the right shape (never read) where a tensor was not kept.
    const at::Tensor x = s[0].defined() ? s[0] : at::empty({shape[0], shape[1]}, w1.options());
    const at::Tensor h = s[3].defined() ? s[3] : at::empty({shape[0], shape[2]}, w1.options());
    const Saved what = saved_for(parse_activation(activation));
    const at::Tensor saved = what == Saved::Pre ? (s[4].defined() ? s[4] : h)
                                                : (what == Saved::Output ? h : at::empty({0}, w1.options()));
    at::Tensor g = grads[0];
    if (g.scalar_type() != w1.scalar_type()) g = g.to(w1.scalar_type());
    auto [gx, gw1, gb1, gw2, gb2] = mlp_bwd_op().call(g, x, w1, s[2], h, saved, activation,
                                                      need[0], need[1], need[2], need[3], need[4]);
    return {need[0] ? gx : undef(), need[1] ? gw1 : undef(), need[2] ? gb1 : undef(),
            need[3] ? gw2 : undef(), need[4] ? gb2 : undef(), undef(), undef(), undef(),
            undef(), undef(), undef()};
  }
};

void check_mlp_public(const at::Tensor& x, const at::Tensor& w1,
                      const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
                      const c10::optional<at::Tensor>& b2) {
  check_linear_public(kMlp, x, w1, b1);
  TORCH_CHECK_VALUE(w2.dim() == 2, kMlp, ": w2 must be 2-D (out_features, hidden_features), got "
                    "shape ", py_shape(w2.sizes()));
  TORCH_CHECK_VALUE(w2.size(1) == w1.size(0), kMlp, ": w2 expects ", w2.size(1),
                    " hidden features (w2.shape=", py_shape(w2.sizes()), ") but w1 has ",
                    w1.size(0), " outputs (w1.shape=", py_shape(w1.sizes()), ")");
  if (has(b2)) {
    TORCH_CHECK_VALUE(b2->dim() == 1 && b2->size(0) == w2.size(0), kMlp,
                      ": b2 must have shape (", w2.size(0), ",) to match w2.shape=",
                      py_shape(w2.sizes()), ", got ", py_shape(b2->sizes()));
  }
  const at::Tensor* others[2] = {&w2, has(b2) ? &*b2 : nullptr};
  const char* names[2] = {"w2", "b2"};
  for (int k = 0; k < 2; ++k) {
    if (others[k] == nullptr) continue;
    TORCH_CHECK_TYPE(others[k]->scalar_type() == x.scalar_type(), kMlp, ": x and ", names[k],
                     " must have the same dtype, got x.dtype=", py_dtype(x.scalar_type()),
                     " and ", names[k], ".dtype=", py_dtype(others[k]->scalar_type()));
    TORCH_CHECK(others[k]->device() == x.device(), kMlp, ": x and ", names[k],
                " must be on the same device, got x on ", x.device(), " and ", names[k], " on ",
                others[k]->device());
  }
}

void check_mlp_activation(const std::string& act) {
  TORCH_CHECK_VALUE(parse_activation(act) != Act::Softmax, kMlp,
                    ": activation 'softmax' is not supported");
}

at::Tensor mlp_autograd(const at::Tensor& x, const at::Tensor& w1,
                        const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
                        const c10::optional<at::Tensor>& b2, c10::string_view activation) {
  const std::string act(activation);
  check_mlp_activation(act);
  check_mlp_public(x, w1, b1, w2, b2);
  const bool grad = at::GradMode::is_enabled();
  const bool nx = grad && x.requires_grad(), nw1 = grad && w1.requires_grad();
  const bool nb1 = grad && has(b1) && b1->requires_grad();
  const bool nw2 = grad && w2.requires_grad();
  const bool nb2 = grad && has(b2) && b2->requires_grad();
  const at::Tensor x2 = flatten_rows(x);
  at::Tensor out;
  if (nx || nw1 || nb1 || nw2 || nb2) {
    out = MlpFn::apply(x2, w1, b1, w2, b2, act, nx, nw1, nb1, nw2, nb2);
  } else {
    at::AutoDispatchBelowADInplaceOrView below;
    const at::Tensor h = std::get<0>(linear_fwd_op().call(x2, w1, b1, act, false));
    out = std::get<0>(linear_fwd_op().call(h, w2, b2, "none", false));
  }
  return unflatten_rows(out, x);
}

at::Tensor mlp_plain(const at::Tensor& x, const at::Tensor& w1,
                     const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
                     const c10::optional<at::Tensor>& b2, c10::string_view activation) {
  check_mlp_activation(std::string(activation));
  check_mlp_public(x, w1, b1, w2, b2);
  const at::Tensor h = std::get<0>(linear_fwd_op().call(flatten_rows(x), w1, b1, activation,
                                                        false));
  return unflatten_rows(std::get<0>(linear_fwd_op().call(h, w2, b2, "none", false)), x);
}

// ============================================================================================
// The fused losses
// ============================================================================================

constexpr const char* kBce = "manual_layers.functional.linear_binary_cross_entropy_with_logits";
constexpr const char* kCe = "manual_layers.functional.linear_cross_entropy";

// What the losses' Function keeps between forward and backward (csrc/logreg.h).
void save_loss(AutogradContext* ctx, const LossOut& outs, const at::Tensor& x2,
               const at::Tensor& weight, int64_t reduction, bool nx, bool nw, bool nb) {
  const auto& [loss, gw, gb, residual] = outs;
  // x only where backward reads it: reduction none with a weight gradient (G^T x).
  const at::Tensor xs = reduction == 0 && nw ? x2 : undef();
  ctx->save_for_backward({residual, xs, weight, gw, gb});
  ctx->saved_data["reduction"] = reduction;
  ctx->saved_data["need"] = std::vector<bool>{nx, nw, nb};
}

variable_list loss_backward(AutogradContext* ctx, const variable_list& grads, const char* what,
                            size_t n_inputs) {
  if (at::GradMode::is_enabled()) refuse_double_backward(what);
  const auto s = ctx->get_saved_variables();
  const auto need = ctx->saved_data["need"].toBoolList();
  const int64_t reduction = ctx->saved_data["reduction"].toInt();
  const at::Tensor& weight = s[2];
  auto e = [&](const at::Tensor& t) { return t.defined() ? t : at::empty({0}, weight.options()); };
  auto [gx, gw, gb] = loss_bwd_op().call(grads[0], e(s[0]), e(s[1]), weight, e(s[3]), e(s[4]),
                                         reduction, need[0], need[1], need[2]);
  variable_list out(n_inputs);
  out[0] = need[0] ? gx : undef();
  out[1] = need[1] ? gw : undef();
  out[2] = need[2] ? gb : undef();
  return out;
}

// The loss in the dtype the caller gets: x's dtype, or float32 for 16-bit x under autocast
// (float32_loss), as F.cross_entropy under autocast. The kernels return it in acc_t.
at::Tensor loss_out(const at::Tensor& loss, const at::Tensor& x, bool float32_loss) {
  return float32_loss || loss.scalar_type() == x.scalar_type() ? loss : loss.to(x.scalar_type());
}

class BceFn : public torch::autograd::Function<BceFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                            const c10::optional<at::Tensor>& pos_weight,
                            const c10::optional<at::Tensor>& sample_weight, int64_t reduction,
                            bool float32_loss, bool nx, bool nw, bool nb) {
    at::AutoDispatchBelowADInplaceOrView below;
    LossOut outs = bce_fwd_op().call(x, weight, bias, target, pos_weight, sample_weight,
                                     reduction, nx, nw, nb);
    save_loss(ctx, outs, x, weight, reduction, nx, nw, nb);
    return loss_out(std::get<0>(outs), x, float32_loss);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return loss_backward(ctx, grads, "linear_binary_cross_entropy_with_logits", 11);
  }
};

// Which cross-entropy kernel: the single-pass kernel (_linear_ce_fwd: X read once, per-block
// C x D partials, an N x C residual kept for backward) for small C, the chunked path
// (_linear_ce_chunked_fwd, csrc/ce_chunked.cpp: GEMMs over row chunks, no N x C buffer)
// from kCeChunkedMinClasses classes on (CUDA) or from ce_cpu_chunked_min (CPU). Measured on a
// 2-core VM on 2026-11-28, D 256, fp32, forward + backward of mean loss with dX, dW, db
// (benchmarks/bench_ce_large.py --threshold; README, "Large-vocabulary cross entropy", the
// first path threshold): N 131072: single-pass 232 / 372 / 697 / 1347 ms against chunked 358 /
// 438 / 607 / 1022 ms at C 32 / 64 / 128 / 256; N 4096: chunked 1.4x faster at C 256 to 5.6x at
// C 32000 (single-pass 18.6 s there). The single pass wins while C is small enough that its one
// read of X matters more than GEMM speed; the GEMMs win as C grows.
//
// CPU (2026-11-29, 2-core Intel Xeon with AMX, N 131072, D 256, forward + backward with dX,
// dW, db, medians of 5; README "Large-vocabulary cross entropy"), after the chunked path's dX and
// backward moved to the output cache, its bias gradient into the row pass and the row pass into
// the per-ISA kernels (csrc/cpu/ce_rows.cpp): the single pass's dot products run on fp32 FMAs
// whatever x's dtype, the GEMMs of a native 16-bit type on AMX. Single / chunked ms, mean: bf16
// C 16 31 / 25, C 32 57 / 31, C 64 105 / 35; fp16 (AVX512-FP16 GEMMs) C 24 40 / 47, C 32 51 /
// 45; fp32 C 32 57 / 61, C 48 74 / 69, C 64 100 / 95; fp64 C 32 125 / 120, C 48 196 / 161.
// reduction none (the chunked path computes the logits twice): bf16 C 32 48-52 / 30-31, fp32
// C 64 88-103 / 104-116, C 100 142-146 / 131. So the chunked path from C 32 for a 16-bit x whose
// GEMM oneDNN runs natively (gemm::native_16bit), else from C 48 for mean/sum and C 128 for
// none. Not measured on a CPU without AMX (Zen 4's bf16 GEMM is AVX512-BF16, slower).
//
// CUDA, mean/sum: the chunked path for every C once x holds kCeCudaChunkedMinBytes. The CUDA
// single-pass kernel (logreg_ce_fused.cu) runs its dot products on CUDA cores and is bound by them,
// not by memory. On an H100 (docs/perf-h100-2026-11-28.md, main at c5fdc52) fp32 1,048,576 x 512,
// C 10, loss + grad_W without dX took 3.60 ms of kernel time against 1.94 ms for eager's two GEMMs
// (the chunked path's logits and grad_W GEMMs); bf16 with dX 5.15 ms against 1.55 ms for eager's
// three tensor-core GEMMs (that kernel also wrote dX on CUDA cores; today's writes the residual and
// dX is a GEMM in backward, which leaves the logits and grad_W work of the fp32 case). The
// chunked path's row pass over 1M x 10 logits is a small fraction of either. Below 32 MiB of x
// (tens of microseconds of kernel time at those rates) the single pass, which launches fewer
// kernels, is kept; that threshold is a guess until measured. The chunked path computes dX in
// forward (held until backward: memory the size of x from the forward on). Not yet measured on
// a GPU as a whole path: bench_logreg.py times both paths side by side on CUDA.
// reduction="none" keeps the single-pass choice (there the GEMM path holds the N x C residual
// instead of recomputing the logits in backward). 16-bit and fp32 x in the shapes of the
// tensor-core single pass (csrc/cuda/logreg_ce_tc.cu, ce_tc_shape_ok in csrc/logreg.h: C <= 64,
// D % 8 == 0, D up to 1024 for C <= 16) keeps the single pass at every size: its products run
// on tensor cores and it reads X once, where the chunked path reads it twice (not yet timed on
// a GPU).
// Where that kernel cannot run after all (a GPU older than sm_80, too little shared memory)
// the single op falls back to the CUDA-core kernel or the GEMM path.
//
// MANUAL_LAYERS_CE_PATH=chunked|single forces one (tests, benchmarks). Shapes, dtype, device,
// reduction and this machine's fixed facts (its GEMMs, its GPU) only: the choice is the same in
// eager mode and under tracing.
constexpr int64_t kCeChunkedMinClasses = 128;
constexpr int64_t kCeCudaChunkedMinBytes = int64_t(32) << 20;
int64_t ce_cpu_chunked_min(const at::Tensor& x, int64_t reduction) {
  if (gemm::native_16bit(x)) return 32;
  return reduction == 0 ? kCeChunkedMinClasses : 48;
}

bool ce_use_chunked(const at::Tensor& x, const at::Tensor& weight, int64_t reduction) {
  if (const char* env = std::getenv("MANUAL_LAYERS_CE_PATH")) {
    const std::string v(env);
    if (v == "chunked") return true;
    if (v == "single") return false;
  }
  const int64_t C = weight.size(0);
#ifdef WITH_CUDA
  // The tensor-core kernel's cluster instances (sm_90a, opt-in) read X once for C up to 256.
  if (x.is_cuda() && reduction != 0 && ce_tc_enabled() &&
      ce_tc_cluster_shape_ok(x.scalar_type(), C, weight.size(1)) &&
      ce_tc_cluster_device_ok(x.device().index()))
    return false;
#endif
  if (C >= kCeChunkedMinClasses) return true;
  if (x.is_cpu()) return C >= ce_cpu_chunked_min(x, reduction);
  if (!x.is_cuda() || reduction == 0) return false;
  // The tensor-core single pass reads X once; the chunked GEMMs read it twice.
  if (ce_tc_enabled() && ce_tc_shape_ok(x.scalar_type(), C, weight.size(1))) return false;
  // sym_numel: under torch.compile with dynamic shapes the size is symbolic (the comparison
  // then guards on it).
  return x.sym_numel() * static_cast<int64_t>(x.element_size()) >= kCeCudaChunkedMinBytes;
}

class CeFn : public torch::autograd::Function<CeFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                            const c10::optional<at::Tensor>& class_weight, int64_t ignore_index,
                            double label_smoothing, int64_t reduction, bool float32_loss,
                            bool nx, bool nw, bool nb) {
    at::AutoDispatchBelowADInplaceOrView below;
    const bool chunked = ce_use_chunked(x, weight, reduction);
    ctx->saved_data["chunked"] = chunked;
    if (!chunked) {
      LossOut outs = ce_fwd_op().call(x, weight, bias, target, class_weight, ignore_index,
                                      label_smoothing, reduction, nx, nw, nb);
      save_loss(ctx, outs, x, weight, reduction, nx, nw, nb);
      return loss_out(std::get<0>(outs), x, float32_loss);
    }
    // Chunked: mean/sum compute every gradient in forward (for grad_output 1; the N x C
    // residual never exists) and backward scales them; none keeps the inputs and recomputes.
    LossOut outs = ce_chunked_fwd_op().call(x, weight, bias, target, class_weight, ignore_index,
                                            label_smoothing, reduction, nx, nw, nb);
    const auto& [loss, gw, gb, gx] = outs;
    if (reduction == 0) {
      ctx->save_for_backward({x, weight, has(bias) ? *bias : undef(), target,
                              has(class_weight) ? *class_weight : undef()});
      ctx->saved_data["ignore_index"] = ignore_index;
      ctx->saved_data["label_smoothing"] = label_smoothing;
    } else {
      ctx->save_for_backward({gx, gw, gb, weight});
    }
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["need"] = std::vector<bool>{nx, nw, nb};
    return loss_out(loss, x, float32_loss);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!ctx->saved_data["chunked"].toBool()) {
      return loss_backward(ctx, grads, "linear_cross_entropy", 12);
    }
    if (at::GradMode::is_enabled()) refuse_double_backward("linear_cross_entropy");
    const auto s = ctx->get_saved_variables();
    const auto need = ctx->saved_data["need"].toBoolList();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    variable_list out(12);
    if (reduction == 0) {
      auto [gx, gw, gb] = ce_chunked_bwd_op().call(
          grads[0], s[0], s[1], opt(s[2]), s[3], opt(s[4]),
          ctx->saved_data["ignore_index"].toInt(), ctx->saved_data["label_smoothing"].toDouble(),
          need[0], need[1], need[2]);
      out[0] = need[0] ? gx : undef();
      out[1] = need[1] ? gw : undef();
      out[2] = need[2] ? gb : undef();
      return out;
    }
    // Scale the forward's gradients by grad_output on the device (no host sync).
    const at::Tensor& weight = s[3];
    const auto dt = weight.scalar_type();
    const at::Tensor g = grads[0].reshape({}).to(at::toOpMathType(dt));
    if (need[0]) {  // x's dtype (a 0-d tensor does not promote it); CPU: the output cache's memory
      at::Tensor gx = empty_for_write(s[0].sizes(), s[0].options());
      out[0] = at::mul_out(gx, s[0], g);
    }
    if (need[1]) out[1] = (s[1] * g).to(dt);
    if (need[2]) out[2] = (s[2] * g).to(dt);
    return out;
  }
};

// Arguments of linear_bce after checks: flattened x, (N,) target and sample weights, (1,)
// pos_weight, the reduction's output shape.
struct BceArgs {
  at::Tensor x2, target, pos_weight, sample_weight;
};

BceArgs prepare_bce(const at::Tensor& x, const at::Tensor& weight,
                    const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                    const c10::optional<at::Tensor>& pos_weight,
                    const c10::optional<at::Tensor>& sample_weight, int64_t reduction,
                    bool grad_mode) {
  check_loss_reduction(kBce, reduction);
  TORCH_CHECK_VALUE(!(weight.dim() == 2 && weight.size(0) != 1), kBce,
                    ": weight must have shape (1, D) for a binary classifier, got ",
                    py_shape(weight.sizes()), "; use linear_cross_entropy for ", weight.size(0),
                    " classes");
  check_linear_public(kBce, x, weight, bias);
  const auto lead = x.sizes().slice(0, x.dim() - 1);
  TORCH_CHECK_VALUE(target.sizes() == lead, kBce, ": target must have shape ", py_shape(lead),
                    " (x.shape[:-1]), got ", py_shape(target.sizes()));
  TORCH_CHECK_TYPE(at::isFloatingType(target.scalar_type()), kBce,
                   ": target must be a floating-point tensor of probabilities, got dtype ",
                   py_dtype(target.scalar_type()));
  check_same_device(kBce, "target", target, x);
  check_no_grad(kBce, "target", target, grad_mode);
  BceArgs a;
  a.x2 = flatten_rows(x);
  a.target = target.reshape({-1});
  if (has(pos_weight)) {
    check_no_grad(kBce, "pos_weight", pos_weight, grad_mode);
    TORCH_CHECK_VALUE(pos_weight->numel() == 1, kBce,
                      ": pos_weight must have one element (a binary classifier has one class), "
                      "got shape ", py_shape(pos_weight->sizes()));
    check_same_device(kBce, "pos_weight", *pos_weight, x);
    // Finite check only where it costs no device synchronisation, and only on real tensors
    // (not the fake / functional tensors of torch.compile and torch.export tracing).
    const auto traced = c10::DispatchKeySet(
        {c10::DispatchKey::Python, c10::DispatchKey::Functionalize});
    if (pos_weight->device().is_cpu() && !pos_weight->key_set().has_any(traced)) {
      const double pw = pos_weight->to(at::kDouble).item<double>();
      TORCH_CHECK_VALUE(std::isfinite(pw), kBce, ": pos_weight must be finite, got ", pw);
    }
    a.pos_weight = pos_weight->reshape({1});
  }
  if (has(sample_weight)) {
    check_no_grad(kBce, "sample_weight", sample_weight, grad_mode);
    check_same_device(kBce, "sample_weight", *sample_weight, x);
    TORCH_CHECK_VALUE(at::is_expandable_to(sample_weight->sizes(), lead), kBce,
                      ": sample_weight of shape ", py_shape(sample_weight->sizes()),
                      " does not broadcast to the target's shape ", py_shape(lead));
    a.sample_weight = sample_weight->expand(lead).reshape({-1}).contiguous();
  }
  return a;
}

at::Tensor reshape_loss(const at::Tensor& loss, const at::Tensor& x, int64_t reduction) {
  if (reduction != 0) return loss;
  return loss.reshape(x.sizes().slice(0, x.dim() - 1));
}

at::Tensor linear_bce_autograd(const at::Tensor& x, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                               const c10::optional<at::Tensor>& pos_weight,
                               const c10::optional<at::Tensor>& sample_weight, int64_t reduction,
                               bool float32_loss) {
  const bool grad = at::GradMode::is_enabled();
  BceArgs a = prepare_bce(x, weight, bias, target, pos_weight, sample_weight, reduction, grad);
  const bool nx = grad && x.requires_grad(), nw = grad && weight.requires_grad();
  const bool nb = grad && has(bias) && bias->requires_grad();
  at::Tensor loss;
  if (nx || nw || nb) {
    loss = BceFn::apply(a.x2, weight, bias, a.target, opt(a.pos_weight), opt(a.sample_weight),
                        reduction, float32_loss, nx, nw, nb);
  } else {
    at::AutoDispatchBelowADInplaceOrView below;
    loss = loss_out(std::get<0>(bce_fwd_op().call(a.x2, weight, bias, a.target, opt(a.pos_weight),
                                                  opt(a.sample_weight), reduction, false, false,
                                                  false)),
                    x, float32_loss);
  }
  return reshape_loss(loss, x, reduction);
}

at::Tensor linear_bce_plain(const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                            const c10::optional<at::Tensor>& pos_weight,
                            const c10::optional<at::Tensor>& sample_weight, int64_t reduction,
                            bool float32_loss) {
  BceArgs a = prepare_bce(x, weight, bias, target, pos_weight, sample_weight, reduction, false);
  const at::Tensor loss = std::get<0>(bce_fwd_op().call(a.x2, weight, bias, a.target,
                                                        opt(a.pos_weight), opt(a.sample_weight),
                                                        reduction, false, false, false));
  return reshape_loss(loss_out(loss, x, float32_loss), x, reduction);
}

struct CeArgs {
  at::Tensor x2, target, class_weight;
};

CeArgs prepare_ce(const at::Tensor& x, const at::Tensor& weight,
                  const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                  const c10::optional<at::Tensor>& class_weight, double label_smoothing,
                  int64_t reduction, bool grad_mode) {
  check_loss_reduction(kCe, reduction);
  check_linear_public(kCe, x, weight, bias);
  const auto lead = x.sizes().slice(0, x.dim() - 1);
  TORCH_CHECK_VALUE(target.sizes() == lead, kCe, ": target must have shape ", py_shape(lead),
                    " (x.shape[:-1]) of class indices, got ", py_shape(target.sizes()));
  const auto tt = target.scalar_type();
  TORCH_CHECK_TYPE(at::isIntegralType(tt, /*includeBool=*/false), kCe,
                   ": target must hold integer class indices, got dtype ", py_dtype(tt),
                   " (probability targets are not supported by the fused kernel)");
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0, kCe,
                    ": label_smoothing must be in [0, 1], got ", label_smoothing);
  check_same_device(kCe, "target", target, x);
  CeArgs a;
  a.x2 = flatten_rows(x);
  a.target = target.reshape({-1});
  if (a.target.scalar_type() != at::kLong) a.target = a.target.to(at::kLong);
  if (has(class_weight)) {
    check_no_grad(kCe, "class_weight", class_weight, grad_mode);
    const int64_t C = weight.size(0);
    TORCH_CHECK_VALUE(class_weight->dim() == 1 && class_weight->size(0) == C, kCe,
                      ": class_weight must have shape (", C, ",), one weight per class, got ",
                      py_shape(class_weight->sizes()));
    check_same_device(kCe, "class_weight", *class_weight, x);
    TORCH_CHECK_TYPE(at::isFloatingType(class_weight->scalar_type()), kCe,
                     ": class_weight must be a floating-point tensor, got dtype ",
                     py_dtype(class_weight->scalar_type()));
    a.class_weight = class_weight->contiguous();
  }
  return a;
}

at::Tensor linear_ce_autograd(const at::Tensor& x, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                              const c10::optional<at::Tensor>& class_weight,
                              int64_t ignore_index, double label_smoothing, int64_t reduction,
                              bool float32_loss) {
  const bool grad = at::GradMode::is_enabled();
  CeArgs a = prepare_ce(x, weight, bias, target, class_weight, label_smoothing, reduction, grad);
  const bool nx = grad && x.requires_grad(), nw = grad && weight.requires_grad();
  const bool nb = grad && has(bias) && bias->requires_grad();
  at::Tensor loss;
  if (nx || nw || nb) {
    loss = CeFn::apply(a.x2, weight, bias, a.target, opt(a.class_weight), ignore_index,
                       label_smoothing, reduction, float32_loss, nx, nw, nb);
  } else {
    at::AutoDispatchBelowADInplaceOrView below;
    const auto& op =
        ce_use_chunked(a.x2, weight, reduction) ? ce_chunked_fwd_op() : ce_fwd_op();
    loss = loss_out(std::get<0>(op.call(a.x2, weight, bias, a.target,
                                                 opt(a.class_weight), ignore_index,
                                                 label_smoothing, reduction, false, false,
                                                 false)),
                    x, float32_loss);
  }
  return reshape_loss(loss, x, reduction);
}

at::Tensor linear_ce_plain(const at::Tensor& x, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                           const c10::optional<at::Tensor>& class_weight, int64_t ignore_index,
                           double label_smoothing, int64_t reduction, bool float32_loss) {
  CeArgs a = prepare_ce(x, weight, bias, target, class_weight, label_smoothing, reduction, false);
  const auto& op =
      ce_use_chunked(a.x2, weight, reduction) ? ce_chunked_fwd_op() : ce_fwd_op();
  const at::Tensor loss = std::get<0>(op.call(a.x2, weight, bias, a.target,
                                                       opt(a.class_weight), ignore_index,
                                                       label_smoothing, reduction, false, false,
                                                       false));
  return reshape_loss(loss_out(loss, x, float32_loss), x, reduction);
}

}  // namespace
}  // namespace manual_layers

TORCH_LIBRARY_IMPL(manual_layers, Autograd, m) {
  m.impl("mlp", &manual_layers::mlp_autograd);
  m.impl("linear", &manual_layers::linear_autograd);
  m.impl("linear_bce", &manual_layers::linear_bce_autograd);
  m.impl("linear_ce", &manual_layers::linear_ce_autograd);
}

TORCH_LIBRARY_IMPL(manual_layers, CPU, m) {
  m.impl("mlp", &manual_layers::mlp_plain);
  m.impl("linear", &manual_layers::linear_plain);
  m.impl("linear_bce", &manual_layers::linear_bce_plain);
  m.impl("linear_ce", &manual_layers::linear_ce_plain);
}

TORCH_LIBRARY_IMPL(manual_layers, CUDA, m) {
  m.impl("mlp", &manual_layers::mlp_plain);
  m.impl("linear", &manual_layers::linear_plain);
  m.impl("linear_bce", &manual_layers::linear_bce_plain);
  m.impl("linear_ce", &manual_layers::linear_ce_plain);
}
