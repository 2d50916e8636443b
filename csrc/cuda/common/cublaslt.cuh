// cuBLASLt matmul wrapper: lt_matmul(), one cuBLASLt matmul with an optional epilogue, through a
// cache of plans (descriptors, layouts and the heuristic's algorithm) keyed by the problem. It
// never throws for a cuBLASLt problem: it returns the first status that is not
// CUBLAS_STATUS_SUCCESS, and the caller must then produce the result another way (at::mm /
// at::addmm). Only the files that call cuBLASLt include it (csrc/cuda/linear/linear.cu); the rest
// of the helpers are cuda_common.cuh. Header-only (inline).
#pragma once

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cublasLt.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <unordered_map>

#include "cuda_common.cuh"

namespace manual_layers {
namespace cuda_common {

// ---------------------------------------------------------------------------------------------
// cuBLASLt matmul wrapper
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
