// Small CUDA helpers shared by the manual_layers .cu files (csrc/cuda/linear/, csrc/cuda/losses/).
//
// Contents:
//   1. launch and host helpers: kThreads, ceil_div, num_sms, grid sizes for grid-stride loops
//      (int64 indexing), 16-byte alignment tests, aligned_contiguous(), acc_type_of, empty0,
//      opt_data;
//   2. AlignedVec<T, VEC> for 16-byte vector loads/stores;
//   3. warp reductions (sum, max) over all 32 lanes, and over aligned groups of G lanes;
//   4. activation functions act_forward<A>(z) and act_backward<A>(g, saved) in the op-math
//      type (float for half/bfloat16/float, double for double), with the exact formulas of
//      torch's nn.ReLU / nn.GELU() / nn.GELU("tanh") / nn.SiLU / nn.Sigmoid / nn.Tanh;
//   5. lt_matmul(): one cuBLASLt matmul with an optional epilogue. It never throws for a
//      cuBLASLt problem: it returns the first status that is not CUBLAS_STATUS_SUCCESS, and
//      the caller must then produce the result another way (at::mm / at::addmm).
//
// Everything is header-only (inline or templates) so that several .cu files can include it.
#pragma once

#include <ATen/Context.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cublasLt.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <unordered_map>

#include "../../common.h"

// A kernel's dynamic shared memory, as a byte array `name` (the host emulation of tests/cuda_emu
// defines its own).
#ifndef ML_DYNAMIC_SMEM
#define ML_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace manual_layers {
namespace cuda_common {

// ---------------------------------------------------------------------------------------------
// 1. Launch helpers
// ---------------------------------------------------------------------------------------------

constexpr int kThreads = 256;  // threads per block of the elementwise kernels (a multiple of 32)

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Streaming multiprocessors of the current device.
inline int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// Blocks for a grid-stride loop over `items` work items with `threads` items per block (a
// thread each, or e.g. a warp each for row kernels: grid_for(rows, warps per block)): enough to
// fill the device (8 blocks per SM) and never more than needed, at least 1.
// The loops index with int64, so any n is covered, and gridDim.x stays far below 2^31 - 1.
inline int64_t grid_for(int64_t items, int threads = kThreads) {
  const int64_t sms = num_sms();
  int64_t blocks = ceil_div(items, threads);
  const int64_t cap = sms * 8;
  if (blocks > cap) blocks = cap;
  if (blocks < 1) blocks = 1;
  return blocks;
}

inline bool is_aligned(const void* p, std::uintptr_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

// A row-major contiguous tensor whose data pointer is 16-byte aligned: t itself when it
// already is, else a fresh copy (the caching allocator returns >= 256-byte aligned blocks).
// Vectorised kernels and cuBLASLt epilogue pointers can then assume 16-byte alignment.
inline at::Tensor aligned_contiguous(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (c.numel() > 0 && !is_aligned(c.data_ptr(), 16)) {
    at::Tensor d = at::empty_like(c, at::MemoryFormat::Contiguous);
    d.copy_(c);
    return d;
  }
  return c;
}

// The accumulation dtype of the kernels (at::opmath_type as a ScalarType): double for double,
// float for float, half and bfloat16.
inline at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The empty (0,) tensor that stands for an output that was not asked for.
inline at::Tensor empty0(const at::TensorOptions& options) { return at::empty({0}, options); }

// The data of an optional input (undefined: nullptr), as T (checked against its dtype).
template <typename T>
inline const T* opt_data(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// ---------------------------------------------------------------------------------------------
// 2. Vector loads and stores (16 bytes: 8 half/bfloat16, 4 float, 2 double)
// ---------------------------------------------------------------------------------------------

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) AlignedVec {
  T val[VEC];
};

template <typename T>
struct VecWidth {
  static constexpr int value = 16 / static_cast<int>(sizeof(T));
};

// p must be aligned to sizeof(T) * VEC bytes.
template <int VEC, typename T>
__device__ __forceinline__ AlignedVec<T, VEC> load_vec(const T* p) {
  return *reinterpret_cast<const AlignedVec<T, VEC>*>(p);
}

template <int VEC, typename T>
__device__ __forceinline__ void store_vec(T* p, const AlignedVec<T, VEC>& v) {
  *reinterpret_cast<AlignedVec<T, VEC>*>(p) = v;
}

// ---------------------------------------------------------------------------------------------
// 3. Warp reductions: every lane of a full warp must call them (all 32 lanes active).
//    The butterfly order is fixed, so results are deterministic.
// ---------------------------------------------------------------------------------------------

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const acc_t o = __shfl_xor_sync(0xffffffffu, v, off);
    v = o > v ? o : v;
  }
  return v;
}

// Reductions over the G lanes of an aligned group (G a power of two <= 32: xor offsets below G
// stay inside the group), in warp_sum / warp_max's butterfly order (the same for G = 32). Every
// lane of the warp must call them.
template <int G, typename acc_t, typename Op>
__device__ __forceinline__ acc_t group_reduce(acc_t v, Op op) {
#pragma unroll
  for (int off = G / 2; off > 0; off >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

template <int G, typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t v) {
  return group_reduce<G>(v, [](acc_t a, acc_t b) { return a + b; });
}

template <int G, typename acc_t>
__device__ __forceinline__ acc_t group_max(acc_t v) {
  return group_reduce<G>(v, [](acc_t a, acc_t o) { return o > a ? o : a; });
}

// ---------------------------------------------------------------------------------------------
// 4. Activations (and the exp / log / log1p the loss kernels use) in the op-math type (float
//    or double). Precise library functions (the extension is not built with --use_fast_math).
//    __host__ too, so that host tests can check them.
// ---------------------------------------------------------------------------------------------

__host__ __device__ __forceinline__ float ml_exp(float v) { return expf(v); }
__host__ __device__ __forceinline__ double ml_exp(double v) { return exp(v); }
__host__ __device__ __forceinline__ float ml_log(float v) { return logf(v); }
__host__ __device__ __forceinline__ double ml_log(double v) { return log(v); }
__host__ __device__ __forceinline__ float ml_log1p(float v) { return log1pf(v); }
__host__ __device__ __forceinline__ double ml_log1p(double v) { return log1p(v); }
__host__ __device__ __forceinline__ float ml_erf(float v) { return erff(v); }
__host__ __device__ __forceinline__ double ml_erf(double v) { return erf(v); }
__host__ __device__ __forceinline__ float ml_tanh(float v) { return tanhf(v); }
__host__ __device__ __forceinline__ double ml_tanh(double v) { return tanh(v); }

template <typename acc_t>
__host__ __device__ __forceinline__ acc_t ml_sigmoid(acc_t z) {
  return acc_t(1) / (acc_t(1) + ml_exp(-z));
}

// GELU constants, as in ATen's GeluKernel.
constexpr double kSqrtHalf = 0.70710678118654752440;      // 1/sqrt(2)
constexpr double kInvSqrt2Pi = 0.39894228040143267794;    // 1/sqrt(2*pi)
constexpr double kSqrt2OverPi = 0.79788456080286535588;   // sqrt(2/pi)
constexpr double kGeluKappa = 0.044715;

// y = act(z). Softmax is row-wise and has its own kernels; None is the identity.
template <Act A, typename acc_t>
__host__ __device__ __forceinline__ acc_t act_forward(acc_t z) {
  if constexpr (A == Act::Relu) {
    return z < acc_t(0) ? acc_t(0) : z;  // NaN stays NaN, like torch.relu
  } else if constexpr (A == Act::Gelu) {
    return acc_t(0.5) * z * (acc_t(1) + ml_erf(z * acc_t(kSqrtHalf)));
  } else if constexpr (A == Act::GeluTanh) {
    const acc_t inner = acc_t(kSqrt2OverPi) * (z + acc_t(kGeluKappa) * z * z * z);
    return acc_t(0.5) * z * (acc_t(1) + ml_tanh(inner));
  } else if constexpr (A == Act::Silu) {
    return z * ml_sigmoid(z);
  } else if constexpr (A == Act::Sigmoid) {
    return ml_sigmoid(z);
  } else if constexpr (A == Act::Tanh) {
    return ml_tanh(z);
  } else {
    return z;
  }
}

// grad_pre = g * act'(.), where s is what saved_for(A) names: the pre-activation z for
// Gelu, GeluTanh, Silu; the output y for Relu, Sigmoid, Tanh. None: g.
template <Act A, typename acc_t>
__host__ __device__ __forceinline__ acc_t act_backward(acc_t g, acc_t s) {
  if constexpr (A == Act::Relu) {
    return s <= acc_t(0) ? acc_t(0) : g;  // as threshold_backward(g, y, 0): NaN passes g
  } else if constexpr (A == Act::Gelu) {
    const acc_t cdf = acc_t(0.5) * (acc_t(1) + ml_erf(s * acc_t(kSqrtHalf)));
    const acc_t pdf = ml_exp(acc_t(-0.5) * s * s) * acc_t(kInvSqrt2Pi);
    return g * (cdf + s * pdf);
  } else if constexpr (A == Act::GeluTanh) {
    const acc_t s2 = s * s;
    const acc_t inner = acc_t(kSqrt2OverPi) * (s + acc_t(kGeluKappa) * s2 * s);
    const acc_t t = ml_tanh(inner);
    const acc_t left_d = acc_t(0.5) * (acc_t(1) + t);
    const acc_t right_d = acc_t(0.5) * s * (acc_t(1) - t * t) * acc_t(kSqrt2OverPi) *
                          (acc_t(1) + acc_t(3.0 * kGeluKappa) * s2);
    return g * (left_d + right_d);
  } else if constexpr (A == Act::Silu) {
    const acc_t sg = ml_sigmoid(s);
    return g * sg * (acc_t(1) + s * (acc_t(1) - sg));
  } else if constexpr (A == Act::Sigmoid) {
    return g * s * (acc_t(1) - s);
  } else if constexpr (A == Act::Tanh) {
    return g * (acc_t(1) - s * s);
  } else {
    return g;
  }
}

// ---------------------------------------------------------------------------------------------
// 5. cuBLASLt matmul wrapper
// ---------------------------------------------------------------------------------------------
//
// Column-major problem, as cuBLASLt sees it:  D (m x n, ld ldd) = op(A) . op(B)  [+ epilogue],
//   A stored (transa == N ? m x k : k x m), leading dimension lda;
//   B stored (transb == N ? k x n : n x k), leading dimension ldb;
//   C = D, beta = 0, alpha = 1.
// A row-major (R, Cc) contiguous tensor is a column-major (Cc x R) matrix with ld Cc.
//
// Epilogue pointers:
//   BIAS, RELU_BIAS, GELU_BIAS, GELU_AUX_BIAS: bias = const input of length m, D's type;
//   BGRADA (length m) / BGRADB (length n): bias = output, D's type;
//   GELU_AUX, GELU_AUX_BIAS: aux = output, the pre-activation (m x n, ld aux_ld, D's type);
//     cuBLASLt requires aux_ld % 8 == 0 and aux_ld >= m.
// Pass 16-byte aligned bias and aux pointers (see aligned_contiguous); A, B and D may be less
// aligned: the heuristic is told their actual alignment.
struct LtGemm {
  cublasOperation_t transa = CUBLAS_OP_N;
  cublasOperation_t transb = CUBLAS_OP_N;
  int64_t m = 0, n = 0, k = 0;
  const void* A = nullptr;
  int64_t lda = 0;
  const void* B = nullptr;
  int64_t ldb = 0;
  void* D = nullptr;
  int64_t ldd = 0;
  cudaDataType_t dtype = CUDA_R_32F;                // A, B, D (and bias, aux) element type
  cublasComputeType_t compute = CUBLAS_COMPUTE_32F;  // 64F needs dtype CUDA_R_64F
  cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  void* bias = nullptr;
  void* aux = nullptr;
  int64_t aux_ld = 0;
};

// The plain column-major problem D (m x n, ld ldd) = op(A) (m x k) . op(B) (k x n): the fields
// every call sets; callers then add epilogue, bias and aux.
inline LtGemm lt_gemm(cublasOperation_t transa, cublasOperation_t transb, int64_t m, int64_t n,
                      int64_t k, const void* A, int64_t lda, const void* B, int64_t ldb, void* D,
                      int64_t ldd, cudaDataType_t dtype, cublasComputeType_t compute) {
  LtGemm g;
  g.transa = transa;
  g.transb = transb;
  g.m = m;
  g.n = n;
  g.k = k;
  g.A = A;
  g.lda = lda;
  g.B = B;
  g.ldb = ldb;
  g.D = D;
  g.ldd = ldd;
  g.dtype = dtype;
  g.compute = compute;
  return g;
}

// Upper bound on the workspace a heuristic may ask for; only what the chosen algorithm needs
// is allocated, from the caching allocator.
constexpr uint64_t kLtMaxWorkspaceBytes = 8ull << 20;

// MANUAL_LAYERS_DISABLE_CUBLASLT=1 turns every cuBLASLt call off (the callers' at::mm /
// at::addmm fallbacks then run): a debugging and testing switch, read once per process.
inline bool lt_disabled_by_env() {
  static const bool disabled = [] {
    const char* v = std::getenv("MANUAL_LAYERS_DISABLE_CUBLASLT");
    return v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
  }();
  return disabled;
}

// Whether a GEMM of these sizes should be tried with cuBLASLt at all. Mirrors the conditions
// under which torch's addmm uses cuBLASLt: every dimension > 1 (cuBLASLt rejected or
// mishandled dimension-1 operands in some versions) and, before cuBLASLt 12.1, every dimension
// < 65535 * 32 (very tall matrices failed on older CUDA).
inline bool lt_shape_ok(int64_t m, int64_t n, int64_t k) {
  if (m < 2 || n < 2 || k < 2) return false;
  static const bool old_lt = cublasLtGetVersion() < 120100;
  if (old_lt) {
    const int64_t lim = 65535LL * 32;
    if (m >= lim || n >= lim || k >= lim) return false;
  }
  return true;
}

// Largest power of two (<= 256) dividing the address: the alignment the heuristic may assume.
inline uint32_t ptr_alignment(const void* p) {
  const std::uintptr_t a = reinterpret_cast<std::uintptr_t>(p);
  uint32_t al = 1;
  while (al < 256 && a % (2u * al) == 0) al *= 2;
  return al;
}

namespace detail {
struct LtDesc {
  cublasLtMatmulDesc_t h = nullptr;
  ~LtDesc() { if (h) cublasLtMatmulDescDestroy(h); }
};
struct LtLayout {
  cublasLtMatrixLayout_t h = nullptr;
  ~LtLayout() { if (h) cublasLtMatrixLayoutDestroy(h); }
};
struct LtPref {
  cublasLtMatmulPreference_t h = nullptr;
  ~LtPref() { if (h) cublasLtMatmulPreferenceDestroy(h); }
};
}  // namespace detail

#define ML_LT_TRY(expr)                                      \
  do {                                                       \
    const cublasStatus_t ml_lt_status_ = (expr);             \
    if (ml_lt_status_ != CUBLAS_STATUS_SUCCESS) return ml_lt_status_; \
  } while (0)

// Everything about one matmul problem that cuBLASLt's descriptors and heuristic depend on;
// pointers themselves are not part of it (only their alignment, which the heuristic is told).
// No padding bytes (7 x 8 + 12 x 4 = 104), so raw bytes compare and hash.
struct LtKey {
  int64_t m, n, k, lda, ldb, ldd, aux_ld;
  int32_t device, transa, transb, dtype, compute;
  uint32_t epilogue, has_bias, has_aux, al_a, al_b, al_d, unused;
  bool operator==(const LtKey& o) const {
    return std::memcmp(this, &o, sizeof(LtKey)) == 0;
  }
};
static_assert(sizeof(LtKey) == 104, "LtKey must have no padding");
struct LtKeyHash {
  size_t operator()(const LtKey& k) const {
    const unsigned char* p = reinterpret_cast<const unsigned char*>(&k);
    size_t h = 1469598103934665603ull;  // FNV-1a over the (zero-initialised) bytes
    for (size_t i = 0; i < sizeof(LtKey); ++i) h = (h ^ p[i]) * 1099511628211ull;
    return h;
  }
};

// The cached part of a matmul: descriptors, layouts and the algorithm the heuristic chose
// (or the status that said there is none, so a failing problem is not re-queried each call).
struct LtPlan {
  cublasStatus_t status = CUBLAS_STATUS_NOT_INITIALIZED;
  detail::LtDesc op;
  detail::LtLayout la, lb, ld;
  cublasLtMatmulAlgo_t algo;
  size_t workspace = 0;
};

// The bias and aux pointers of an epilogue into a matmul descriptor (those g has).
inline cublasStatus_t lt_set_epilogue_pointers(cublasLtMatmulDesc_t desc, const LtGemm& g) {
  if (g.bias != nullptr) {
    const void* bp = g.bias;
    ML_LT_TRY(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bp,
                                             sizeof(bp)));
  }
  if (g.aux != nullptr) {
    const void* ap = g.aux;
    ML_LT_TRY(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &ap,
                                             sizeof(ap)));
  }
  return CUBLAS_STATUS_SUCCESS;
}

// Builds a plan: descriptors, layouts, preference and one heuristic query.
inline cublasStatus_t lt_make_plan(const LtGemm& g, const LtKey& key, cublasLtHandle_t handle,
                                   LtPlan* plan) {
  const bool f64 = g.compute == CUBLAS_COMPUTE_64F || g.compute == CUBLAS_COMPUTE_64F_PEDANTIC;
  const cudaDataType_t scale_type = f64 ? CUDA_R_64F : CUDA_R_32F;
  ML_LT_TRY(cublasLtMatmulDescCreate(&plan->op.h, g.compute, scale_type));
  const int32_t ta = g.transa, tb = g.transb;
  ML_LT_TRY(cublasLtMatmulDescSetAttribute(plan->op.h, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  ML_LT_TRY(cublasLtMatmulDescSetAttribute(plan->op.h, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  const uint32_t epi = static_cast<uint32_t>(g.epilogue);
  ML_LT_TRY(cublasLtMatmulDescSetAttribute(plan->op.h, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi,
                                           sizeof(epi)));
  // The heuristic sees the epilogue's pointers as set (values are replaced on every call).
  ML_LT_TRY(lt_set_epilogue_pointers(plan->op.h, g));
  if (g.aux != nullptr) {
    const int64_t ald = g.aux_ld;
    ML_LT_TRY(cublasLtMatmulDescSetAttribute(plan->op.h, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD,
                                             &ald, sizeof(ald)));
  }
  const bool a_n = g.transa == CUBLAS_OP_N, b_n = g.transb == CUBLAS_OP_N;
  ML_LT_TRY(cublasLtMatrixLayoutCreate(&plan->la.h, g.dtype, a_n ? g.m : g.k, a_n ? g.k : g.m,
                                       g.lda));
  ML_LT_TRY(cublasLtMatrixLayoutCreate(&plan->lb.h, g.dtype, b_n ? g.k : g.n, b_n ? g.n : g.k,
                                       g.ldb));
  ML_LT_TRY(cublasLtMatrixLayoutCreate(&plan->ld.h, g.dtype, g.m, g.n, g.ldd));

  detail::LtPref pref;
  ML_LT_TRY(cublasLtMatmulPreferenceCreate(&pref.h));
  const uint64_t max_ws = kLtMaxWorkspaceBytes;
  ML_LT_TRY(cublasLtMatmulPreferenceSetAttribute(pref.h, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                 &max_ws, sizeof(max_ws)));
  {
    // Split-K: never the INPLACE scheme (it accumulates the parts into D in whatever order they
    // finish: not reproducible run to run). Algorithms without split-K (scheme NONE) always
    // stay allowed. For fp16 / bf16 also not OUTPUT_TYPE: partial sums stay in fp32 instead
    // of being rounded to 16 bits between the parts.
    const bool half_like = g.dtype == CUDA_R_16F || g.dtype == CUDA_R_16BF;
    const uint32_t mask = half_like ? static_cast<uint32_t>(CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE)
                                    : static_cast<uint32_t>(CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE |
                                                            CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE);
    ML_LT_TRY(cublasLtMatmulPreferenceSetAttribute(
        pref.h, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &mask, sizeof(mask)));
  }
  ML_LT_TRY(cublasLtMatmulPreferenceSetAttribute(pref.h, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                                                 &key.al_a, sizeof(key.al_a)));
  ML_LT_TRY(cublasLtMatmulPreferenceSetAttribute(pref.h, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                                                 &key.al_b, sizeof(key.al_b)));
  ML_LT_TRY(cublasLtMatmulPreferenceSetAttribute(pref.h, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                                                 &key.al_d, sizeof(key.al_d)));
  ML_LT_TRY(cublasLtMatmulPreferenceSetAttribute(pref.h, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                                                 &key.al_d, sizeof(key.al_d)));

  cublasLtMatmulHeuristicResult_t heur;
  std::memset(&heur, 0, sizeof(heur));
  int returned = 0;
  ML_LT_TRY(cublasLtMatmulAlgoGetHeuristic(handle, plan->op.h, plan->la.h, plan->lb.h, plan->ld.h,
                                           plan->ld.h, pref.h, 1, &heur, &returned));
  if (returned < 1 || heur.state != CUBLAS_STATUS_SUCCESS) return CUBLAS_STATUS_NOT_SUPPORTED;
  if (heur.workspaceSize > max_ws) return CUBLAS_STATUS_NOT_SUPPORTED;
  plan->algo = heur.algo;
  plan->workspace = heur.workspaceSize;
  return CUBLAS_STATUS_SUCCESS;
}

// The plan of a problem, built on first use and then reused (issue #6: descriptors, layouts
// and heuristic queries made afresh on every call were a large part of the host time of small
// layers). One cache per host thread, so the descriptors it mutates (bias / aux pointers) are
// never shared between threads; bounded (cleared when it reaches kLtCacheMax plans). Plans are
// intentionally not destroyed at thread exit (cuBLASLt may be unloaded by then).
constexpr size_t kLtCacheMax = 1024;

inline LtPlan* lt_plan(const LtGemm& g, const LtKey& key, cublasLtHandle_t handle) {
  thread_local auto* cache = new std::unordered_map<LtKey, LtPlan*, LtKeyHash>();
  auto it = cache->find(key);
  if (it != cache->end()) return it->second;
  if (cache->size() >= kLtCacheMax) {
    for (auto& kv : *cache) delete kv.second;
    cache->clear();
  }
  auto* plan = new LtPlan();
  plan->status = lt_make_plan(g, key, handle, plan);
  cache->emplace(key, plan);
  return plan;
}

// Enqueues the matmul on the current stream with the current device's cuBLASLt handle
// (the caller holds a CUDAGuard for the tensors' device). Returns CUBLAS_STATUS_SUCCESS when
// the matmul was enqueued; any other status (also CUBLAS_STATUS_NOT_SUPPORTED when the
// heuristic finds no algorithm, or when cuBLASLt is disabled by the environment) means that
// D / bias / aux must be treated as unwritten. ws_options: device options for the workspace.
inline cublasStatus_t lt_matmul(const LtGemm& g, const at::TensorOptions& ws_options) {
  if (lt_disabled_by_env()) return CUBLAS_STATUS_NOT_SUPPORTED;
  if (g.m <= 0 || g.n <= 0 || g.k <= 0) return CUBLAS_STATUS_INVALID_VALUE;
  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool f64 = g.compute == CUBLAS_COMPUTE_64F || g.compute == CUBLAS_COMPUTE_64F_PEDANTIC;

  LtKey key;
  std::memset(&key, 0, sizeof(key));  // padding bytes too: the key is hashed and compared raw
  key.device = static_cast<int>(c10::cuda::current_device());
  key.transa = g.transa;
  key.transb = g.transb;
  key.m = g.m, key.n = g.n, key.k = g.k;
  key.lda = g.lda, key.ldb = g.ldb, key.ldd = g.ldd, key.aux_ld = g.aux_ld;
  key.dtype = static_cast<int32_t>(g.dtype);
  key.compute = static_cast<int32_t>(g.compute);
  key.epilogue = static_cast<uint32_t>(g.epilogue);
  key.has_bias = g.bias != nullptr;
  key.has_aux = g.aux != nullptr;
  key.al_a = ptr_alignment(g.A);
  key.al_b = ptr_alignment(g.B);
  key.al_d = ptr_alignment(g.D);
  LtPlan* plan = lt_plan(g, key, handle);
  if (plan->status != CUBLAS_STATUS_SUCCESS) return plan->status;

  // This call's epilogue pointers.
  ML_LT_TRY(lt_set_epilogue_pointers(plan->op.h, g));

  // The workspace comes from the caching allocator and goes back to it when this function
  // returns; that is safe because the allocator only reuses it for work queued later on the
  // same stream.
  at::Tensor workspace;
  void* ws_ptr = nullptr;
  if (plan->workspace > 0) {
    workspace = at::empty({static_cast<int64_t>(plan->workspace)}, ws_options.dtype(at::kByte));
    ws_ptr = workspace.data_ptr();
  }

  const float alpha_f = 1.0f, beta_f = 0.0f;
  const double alpha_d = 1.0, beta_d = 0.0;
  const void* alpha = f64 ? static_cast<const void*>(&alpha_d) : static_cast<const void*>(&alpha_f);
  const void* beta = f64 ? static_cast<const void*>(&beta_d) : static_cast<const void*>(&beta_f);
  ML_LT_TRY(cublasLtMatmul(handle, plan->op.h, alpha, g.A, plan->la.h, g.B, plan->lb.h, beta, g.D,
                           plan->ld.h, g.D, plan->ld.h, &plan->algo, ws_ptr, plan->workspace,
                           stream));
  return CUBLAS_STATUS_SUCCESS;
}

#undef ML_LT_TRY

// cuBLASLt element type of a tensor dtype that lt_matmul is used for here, or false.
inline bool lt_dtype(at::ScalarType t, cudaDataType_t* out) {
  switch (t) {
    case at::kFloat: *out = CUDA_R_32F; return true;
    case at::kHalf: *out = CUDA_R_16F; return true;
    case at::kBFloat16: *out = CUDA_R_16BF; return true;
    default: return false;
  }
}

// Compute type for a dtype: fp32 honours torch.backends.cuda.matmul.allow_tf32 (TF32 tensor
// cores when allowed); fp16 / bf16 accumulate in fp32.
inline cublasComputeType_t lt_compute_type(at::ScalarType t) {
  if (t == at::kFloat && at::globalContext().allowTF32CuBLAS()) {
    return CUBLAS_COMPUTE_32F_FAST_TF32;
  }
  return CUBLAS_COMPUTE_32F;
}

}  // namespace cuda_common
}  // namespace manual_layers
