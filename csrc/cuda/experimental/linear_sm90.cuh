// The CUTLASS 3 kernels behind csrc/cuda/experimental/linear_sm90.h, as templates;
// linear_sm90_bf16.cu and linear_sm90_fp16.cu instantiate them (ML_SM90_DEFINE below) for their
// dtype: two files, so that a 2-core build compiles them in parallel (about 1.5 min of nvcc each,
// eight kernels).
//
// Linear's forward: z = x W^T + bias in fp32, aux = z (rounded to T, TMA-stored) when the
// pre-activation is kept, out = act(z) (rounded to T), CUTLASS's fusion
// LinCombPerColBiasEltAct[Aux]. The MLP backward's dgrad: G = (g W2) * act'(saved) and the column
// sums of G, LinCombDeEltActDePerRowBias on the transposed product. act and act' are the project's
// own fp32 functions (act_forward / act_backward in csrc/cuda/common/cuda_common.cuh, those of the
// elementwise kernels), so results differ from the two-pass paths only where those round an
// intermediate to T first.
#pragma once

#ifdef ML_WITH_CUTLASS_SM90

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/operations.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/util/packed_stride.hpp>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "../common/cuda_common.cuh"
#include "linear_sm90.h"

namespace manual_layers {
namespace sm90 {
namespace detail {

// The activation as a CUTLASS epilogue functor: the scalar form, and the fragment form the
// sm_90 epilogue visitor calls (ComputeFn<Array<ElementCompute, FragmentSize>>).
template <Act A, class T>
struct ActOp {
  static constexpr bool kIsHeavy = true;
  CUTLASS_HOST_DEVICE T operator()(T const& z) const { return cuda_common::act_forward<A>(z); }
};

template <Act A, class T, int N>
struct ActOp<A, cutlass::Array<T, N>> {
  static constexpr bool kIsHeavy = true;
  CUTLASS_HOST_DEVICE cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& z) const {
    cutlass::Array<T, N> y;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) y[i] = cuda_common::act_forward<A>(z[i]);
    return y;
  }
};

template <class T>
using GeluErf = ActOp<Act::Gelu, T>;
template <class T>
using Silu = ActOp<Act::Silu, T>;

// act'(s) * g, for the dgrad epilogue (CUTLASS calls it with the GEMM's value and the aux).
template <Act A, class T>
struct DActOp {
  static constexpr bool kIsHeavy = true;
  CUTLASS_HOST_DEVICE T operator()(T const& g, T const& s) const {
    return cuda_common::act_backward<A>(g, s);
  }
};

template <Act A, class T, int N>
struct DActOp<A, cutlass::Array<T, N>> {
  static constexpr bool kIsHeavy = true;
  CUTLASS_HOST_DEVICE cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& g,
                                                      cutlass::Array<T, N> const& s) const {
    cutlass::Array<T, N> y;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) y[i] = cuda_common::act_backward<A>(g[i], s[i]);
    return y;
  }
};

template <class T>
using DGeluErf = DActOp<Act::Gelu, T>;
template <class T>
using DGeluTanh = DActOp<Act::GeluTanh, T>;
template <class T>
using DSilu = DActOp<Act::Silu, T>;
template <class T>
using DRelu = DActOp<Act::Relu, T>;

constexpr int kAlign = 8;  // elements per 16 bytes of a 16-bit type (TMA's row alignment)

// One sm_90 GEMM D (M x N) = A (M x K) . B^T (B: N x K, K-major, CUTLASS's "column-major" B)
// in T with fp32 accumulation: 128 x 256 x 64 tiles, 2 x 1 clusters (the B tile multicast to
// both CTAs), the persistent cooperative schedule, no C operand (beta = 0), the epilogue
// `Fusion`. LayoutA / LayoutD: RowMajor (K-major A, row-major D) or ColumnMajor (M-major A,
// column-major D and aux).
template <class T, class LayoutA, class LayoutD, class Fusion>
struct Sm90Gemm {
  using TileShape = cute::Shape<cute::_128, cute::_256, cute::_64>;
  using ClusterShape = cute::Shape<cute::_2, cute::_1, cute::_1>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutD, kAlign, T,
      LayoutD, kAlign, cutlass::epilogue::TmaWarpSpecializedCooperative, Fusion>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, T, LayoutA, kAlign, T,
      cutlass::layout::ColumnMajor, kAlign, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
  using Kernel =
      cutlass::gemm::kernel::GemmUniversal<cute::Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

// Linear's forward: D = y (rows x features, row-major) = x . w^T; epilogue D = Fn(acc +
// bias[col]) [, aux = acc + bias[col]] (elements: D, compute, (aux,) bias, source, scalar).
template <class T, template <class> class Fn, bool kAux>
using FwdGemm = Sm90Gemm<
    T, cutlass::layout::RowMajor, cutlass::layout::RowMajor,
    std::conditional_t<kAux,
                       cutlass::epilogue::fusion::LinCombPerColBiasEltActAux<
                           cutlass::layout::RowMajor, Fn, T, float, T, T, T, float>,
                       cutlass::epilogue::fusion::LinCombPerColBiasEltAct<Fn, T, float, T, T,
                                                                          float>>>;

// The MLP's dgrad, transposed: D = G^T (hidden x rows, column-major = G row-major) =
// A (hidden x out: w2^T, w2 row-major, so M-major) . B^T (B = g, rows x out, K-major). The
// epilogue (LinCombDeEltActDePerRowBias): D = DFn(acc, aux) with aux = saved^T (column-major
// like D), and the per-row (hidden) sums of DFn's fp32 values over all rows.
template <class T, template <class> class DFn>
using DgradGemm = Sm90Gemm<T, cutlass::layout::ColumnMajor, cutlass::layout::ColumnMajor,
                           cutlass::epilogue::fusion::LinCombDeEltActDePerRowBias<
                               cutlass::layout::ColumnMajor, DFn, T, float, T, T, T, float>>;

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// can_implement, workspace, initialize, run: false when nothing was launched.
template <class Gemm>
bool launch(const typename Gemm::Arguments& args, int device, cudaStream_t stream) {
  if (Gemm::can_implement(args) != cutlass::Status::kSuccess) return false;
  const size_t ws_bytes = Gemm::get_workspace_size(args);
  at::Tensor ws;  // freed in stream order after the launch (PyTorch's caching allocator)
  if (ws_bytes > 0) {
    ws = at::empty({static_cast<int64_t>(ws_bytes)},
                   at::TensorOptions().dtype(at::kByte).device(at::kCUDA, device));
  }
  Gemm gemm;
  if (gemm.initialize(args, ws_bytes > 0 ? ws.data_ptr() : nullptr, stream) !=
      cutlass::Status::kSuccess) {
    return false;  // nothing launched yet (the TMA descriptors or the smem attribute failed)
  }
  const cutlass::Status st = gemm.run(stream);
  TORCH_CHECK(st == cutlass::Status::kSuccess, "manual_layers: an sm_90 CUTLASS kernel failed ",
              "to launch: ", cutlassGetStatusString(st));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

// The arguments every one of these GEMMs shares: D (M x N) = A (M x K) . B^T, packed operands
// in the layouts of the Gemm's kernel, no C, alpha 1, beta 0; the caller adds its epilogue's.
template <class Gemm, class T>
typename Gemm::Arguments gemm_args(const void* A, const void* B, void* D, int M, int N, int K,
                                   int device, int sm_count) {
  using Kernel = typename Gemm::GemmKernel;
  typename Gemm::Arguments args{};
  args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
  args.problem_shape = {M, N, K, 1};
  args.mainloop.ptr_A = static_cast<const T*>(A);
  args.mainloop.dA = cutlass::make_cute_packed_stride(typename Kernel::StrideA{},
                                                      cute::make_shape(M, K, 1));
  args.mainloop.ptr_B = static_cast<const T*>(B);
  args.mainloop.dB = cutlass::make_cute_packed_stride(typename Kernel::StrideB{},
                                                      cute::make_shape(N, K, 1));
  args.epilogue.ptr_C = nullptr;
  args.epilogue.ptr_D = static_cast<T*>(D);
  args.epilogue.dD = cutlass::make_cute_packed_stride(typename Kernel::StrideD{},
                                                      cute::make_shape(M, N, 1));
  args.epilogue.thread.alpha = 1.f;
  args.epilogue.thread.beta = 0.f;
  args.hw_info.device_id = device;
  args.hw_info.sm_count = sm_count;
  return args;
}

template <class T, template <class> class Fn, bool kAux>
bool run(const void* x, const void* w, const void* bias, void* out, void* pre, int rows,
         int features, int in_features, int device, int sm_count, cudaStream_t stream) {
  using Gemm = typename FwdGemm<T, Fn, kAux>::Gemm;
  auto args = gemm_args<Gemm, T>(x, w, out, rows, features, in_features, device, sm_count);
  auto& ep = args.epilogue.thread;
  ep.bias_ptr = static_cast<const T*>(bias);  // nullptr: no bias (a broadcast zero)
  if constexpr (kAux) {
    ep.aux_ptr = static_cast<T*>(pre);
    ep.dAux = cutlass::make_cute_packed_stride(decltype(ep.dAux){},
                                               cute::make_shape(rows, features, 1));
  }
  return launch<Gemm>(args, device, stream);
}

// M = hidden, N = rows, K = out (the transposed product, DgradGemm).
template <class T, template <class> class DFn>
bool run_dgrad(const void* g, const void* w2, const void* saved, void* G, void* db, int rows,
               int hidden, int out, int device, int sm_count, cudaStream_t stream) {
  using Gemm = typename DgradGemm<T, DFn>::Gemm;
  auto args = gemm_args<Gemm, T>(w2, g, G, hidden, rows, out, device, sm_count);
  auto& ep = args.epilogue.thread;
  ep.aux_ptr = static_cast<const T*>(saved);
  ep.dAux = cutlass::make_cute_packed_stride(decltype(ep.dAux){},
                                             cute::make_shape(hidden, rows, 1));
  ep.dbias_ptr = static_cast<T*>(db);  // nullptr: no bias gradient
  return launch<Gemm>(args, device, stream);
}

template <class T>
bool linear_act_fwd_typed(Act act, const void* x, const void* w, const void* bias, void* out,
                          void* pre, int64_t rows, int64_t features, int64_t in_features,
                          int device, int sm_count, cudaStream_t stream) {
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  if (act != Act::Gelu && act != Act::Silu) return false;
  if (rows < 1 || features < 1 || in_features < 1 || rows > kMax || features > kMax ||
      in_features > kMax) {
    return false;
  }
  // TMA: 16-byte aligned bases and row strides (A, B, D, aux); the bias is read as 16-byte
  // vectors.
  if (in_features % kAlign != 0 || features % kAlign != 0) return false;
  if (!aligned16(x) || !aligned16(w) || !aligned16(out) || (pre && !aligned16(pre)) ||
      (bias && !aligned16(bias))) {
    return false;
  }
  const int r = static_cast<int>(rows), f = static_cast<int>(features);
  const int k = static_cast<int>(in_features);
  if (act == Act::Gelu) {
    return pre ? run<T, GeluErf, true>(x, w, bias, out, pre, r, f, k, device, sm_count, stream)
               : run<T, GeluErf, false>(x, w, bias, out, pre, r, f, k, device, sm_count, stream);
  }
  return pre ? run<T, Silu, true>(x, w, bias, out, pre, r, f, k, device, sm_count, stream)
             : run<T, Silu, false>(x, w, bias, out, pre, r, f, k, device, sm_count, stream);
}

template <class T>
bool mlp_dgrad_act_typed(Act act, const void* g, const void* w2, const void* saved, void* G,
                         void* db, int64_t rows, int64_t hidden, int64_t out, int device,
                         int sm_count, cudaStream_t stream) {
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  if (rows < 1 || hidden < 1 || out < 1 || rows > kMax || hidden > kMax || out > kMax) {
    return false;
  }
  if (hidden % kAlign != 0 || out % kAlign != 0) return false;
  if (!aligned16(g) || !aligned16(w2) || !aligned16(saved) || !aligned16(G) ||
      (db && !aligned16(db))) {
    return false;
  }
  const int r = static_cast<int>(rows), h = static_cast<int>(hidden);
  const int o = static_cast<int>(out);
  switch (act) {
    case Act::Gelu:
      return run_dgrad<T, DGeluErf>(g, w2, saved, G, db, r, h, o, device, sm_count, stream);
    case Act::GeluTanh:
      return run_dgrad<T, DGeluTanh>(g, w2, saved, G, db, r, h, o, device, sm_count, stream);
    case Act::Silu:
      return run_dgrad<T, DSilu>(g, w2, saved, G, db, r, h, o, device, sm_count, stream);
    case Act::Relu:
      return run_dgrad<T, DRelu>(g, w2, saved, G, db, r, h, o, device, sm_count, stream);
    default:
      return false;
  }
}

}  // namespace detail
}  // namespace sm90
}  // namespace manual_layers

// The per-dtype entry points of linear_sm90.h (NAME: bf16 / fp16, TYPE: the CUTLASS type).
#define ML_SM90_DEFINE(NAME, TYPE)                                                             \
  namespace manual_layers {                                                                    \
  namespace sm90 {                                                                             \
  bool linear_act_fwd_##NAME(Act act, const void* x, const void* w, const void* bias,         \
                             void* out, void* pre, int64_t rows, int64_t features,             \
                             int64_t in_features, int device, int sm_count,                    \
                             cudaStream_t stream) {                                            \
    return detail::linear_act_fwd_typed<TYPE>(act, x, w, bias, out, pre, rows, features,       \
                                              in_features, device, sm_count, stream);          \
  }                                                                                            \
  bool mlp_dgrad_act_##NAME(Act act, const void* g, const void* w2, const void* saved,         \
                            void* G, void* db, int64_t rows, int64_t hidden, int64_t out,      \
                            int device, int sm_count, cudaStream_t stream) {                   \
    return detail::mlp_dgrad_act_typed<TYPE>(act, g, w2, saved, G, db, rows, hidden, out,      \
                                             device, sm_count, stream);                        \
  }                                                                                            \
  }                                                                                            \
  }

#endif  // ML_WITH_CUTLASS_SM90
