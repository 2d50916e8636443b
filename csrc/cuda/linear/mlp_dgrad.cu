// The MLP backward's middle step on CUDA in one sm_90 CUTLASS kernel (mlp_dgrad_act_cuda,
// csrc/contracts/mlp.h): G = (grad_out W2) * act'(saved) and, when asked, its column sums, with
// dH never written. Used by the device-generic _mlp_bwd (csrc/generic/mlp_bwd.cpp) when
// MANUAL_LAYERS_CUTLASS=1 on an sm_90 GPU and the experimental kernels are built
// (csrc/cuda/experimental/); an empty result otherwise, and the caller composes _linear_bwd.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>

#include <utility>

#include "../../common.h"
#include "../../contracts/mlp.h"
#include "../experimental/linear_sm90.h"

namespace manual_layers {

std::pair<at::Tensor, at::Tensor> mlp_dgrad_act_cuda(const at::Tensor& grad_out,
                                                     const at::Tensor& w2,
                                                     const at::Tensor& saved, Act act,
                                                     bool need_b1) {
  const at::ScalarType dt = grad_out.scalar_type();
  if (!sm90_cutlass_enabled() || !grad_out.is_cuda() ||
      (dt != at::kBFloat16 && dt != at::kHalf) || w2.scalar_type() != dt ||
      saved.scalar_type() != dt || grad_out.dim() != 2 || w2.dim() != 2 ||
      saved.dim() != 2) {
    return {};
  }
  c10::cuda::CUDAGuard guard(grad_out.device());
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  if (prop->major != 9 || prop->minor != 0) return {};
  const int64_t N = grad_out.size(0), O = grad_out.size(1), H = w2.size(1);
  if (N == 0 || O == 0 || H == 0 || w2.size(0) != O || saved.size(0) != N ||
      saved.size(1) != H) {
    return {};
  }
  const at::Tensor g = grad_out.contiguous(), w = w2.contiguous(), s = saved.contiguous();
  const at::Tensor G = at::empty({N, H}, grad_out.options());
  const at::Tensor db = need_b1 ? at::empty({H}, grad_out.options()) : at::Tensor();
  if (!sm90::mlp_dgrad_act(dt, act, g.const_data_ptr(), w.const_data_ptr(), s.const_data_ptr(),
                           G.mutable_data_ptr(), need_b1 ? db.mutable_data_ptr() : nullptr, N,
                           H, O, grad_out.get_device(), prop->multiProcessorCount,
                           at::cuda::getCurrentCUDAStream())) {
    return {};
  }
  return {G, db};
}

}  // namespace manual_layers
