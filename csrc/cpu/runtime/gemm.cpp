// The GEMMs of the kernels (Linear and MLP on the CPU, the losses' backward, the chunked cross
// entropy on any device). ISA-NEUTRAL (no -m flags).
//
// They are ATen's, with one exception: fp16 operands on a CPU whose fp16 GEMM ATen does not run
// through oneDNN (no AVX512-FP16 / AMX-FP16: ATen's own test, mkldnn::_is_mkldnn_fp16_supported)
// are widened to fp32 and multiplied by the fp32 GEMM, and the product is rounded to fp16 once.
// ATen's fallback fp16 GEMM is several times slower than its fp32 one there (2-core Zen 4,
// torch 2.14: 4096x256 @ 256x32000 takes 2.3 s in fp16, 0.44 s in fp32 and 0.21 s in bf16), and
// it accumulates in fp32 and rounds once too, so the results agree to fp32 summation order.
// bf16, fp32, fp64 and every CUDA tensor go straight to ATen; a new CPU product is written into
// empty_for_write's memory (csrc/cpu/runtime/alloc.cpp: reused, already mapped, from 8 MiB).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "../../common.h"

namespace manual_layers {
namespace gemm {
namespace {

// ATen's own tests of whether oneDNN runs its 16-bit GEMMs on this CPU (bf16: AVX512-BF16 or
// AMX-BF16; fp16: AVX512-FP16 or AMX-FP16); false on a torch without oneDNN.
bool mkldnn_says(const char* name) {
  const auto op = c10::Dispatcher::singleton().findSchema({name, ""});
  return op.has_value() && op->typed<bool()>().call();
}
bool fp16_gemm_is_native() {
  static const bool native = mkldnn_says("mkldnn::_is_mkldnn_fp16_supported");
  return native;
}
bool bf16_gemm_is_native() {
  static const bool native = mkldnn_says("mkldnn::_is_mkldnn_bf16_supported");
  return native;
}

inline at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat); }

}  // namespace

bool widens(const at::Tensor& a) {
  return a.is_cpu() && a.scalar_type() == at::kHalf && !fp16_gemm_is_native();
}

bool native_16bit(const at::Tensor& a) {
  if (!a.is_cpu()) return false;
  if (a.scalar_type() == at::kHalf) return fp16_gemm_is_native();
  return a.scalar_type() == at::kBFloat16 && bf16_gemm_is_native();
}

at::Tensor mm(const at::Tensor& a, const at::Tensor& b) {
  if (widens(a)) return at::mm(f32(a), f32(b)).to(at::kHalf);
  if (!a.is_cpu()) return at::mm(a, b);
  at::Tensor out = empty_for_write({a.size(0), b.size(1)}, a.options());
  return at::mm_out(out, a, b);
}

at::Tensor& mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (!widens(a)) return at::mm_out(out, a, b);
  return out.copy_(at::mm(f32(a), f32(b)));
}

at::Tensor addmm(const at::Tensor& bias, const at::Tensor& a, const at::Tensor& b) {
  if (widens(a)) return at::addmm(f32(bias), f32(a), f32(b)).to(at::kHalf);
  if (!a.is_cpu()) return at::addmm(bias, a, b);
  at::Tensor out = empty_for_write({a.size(0), b.size(1)}, a.options());
  return at::addmm_out(out, bias, a, b);
}

at::Tensor& addmm_out(at::Tensor& out, const at::Tensor& bias, const at::Tensor& a,
                      const at::Tensor& b) {
  if (!widens(a)) return at::addmm_out(out, bias, a, b);
  return out.copy_(at::addmm(f32(bias), f32(a), f32(b)));
}

}  // namespace gemm
}  // namespace manual_layers
