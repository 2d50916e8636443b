// The cross-entropy path policy (csrc/policy/ce_path.h). The figures behind each threshold are
// on the documentation's performance page (docs/, "Cross-entropy paths").
#include "ce_path.h"

#include <cstdlib>
#include <string>

#include "../common.h"
#include "../contracts/losses.h"

namespace manual_layers {
namespace {

// From this many classes the chunked GEMMs beat the single pass on every device: the single
// pass rereads the C x D weight for every few rows and keeps C x D partials per block.
constexpr int64_t kCeChunkedMinClasses = 128;
// CUDA, mean/sum: the chunked path from this much x. The CUDA-core single pass is bound by its
// dot products, not by memory; below this size its fewer launches matter more.
constexpr int64_t kCeCudaChunkedMinBytes = int64_t(32) << 20;

// CPU: the single pass does its dot products on fp32 FMAs whatever x's dtype, the GEMMs of a
// 16-bit type that oneDNN runs natively use its 16-bit units; with reduction none the chunked
// path computes the logits twice (forward, backward), so it starts later.
int64_t ce_cpu_chunked_min(const at::Tensor& x, int64_t reduction) {
  if (gemm::native_16bit(x)) return 32;
  return reduction == 0 ? kCeChunkedMinClasses : 48;
}

}  // namespace

bool ce_use_chunked(const at::Tensor& x, const at::Tensor& weight, int64_t reduction) {
  // MANUAL_LAYERS_CE_PATH=chunked|single forces one (tests, benchmarks).
  if (const char* env = std::getenv("MANUAL_LAYERS_CE_PATH")) {
    const std::string v(env);
    if (v == "chunked") return true;
    if (v == "single") return false;
  }
  const int64_t C = weight.size(0);
#ifdef WITH_CUDA
  // The tensor-core kernel's cluster instances (sm_90a, experimental, opt-in) read X once for C
  // up to 256.
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
  // A symbolic N (a traced graph for every batch size): the GEMM path, which serves any size.
  const auto numel = x.sym_numel().maybe_as_int();
  if (!numel) return true;
  return *numel * static_cast<int64_t>(x.element_size()) >= kCeCudaChunkedMinBytes;
}

}  // namespace manual_layers
