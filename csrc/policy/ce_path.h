// Which kernel path a cross entropy takes: the one place that decides (csrc/policy/ce_path.cpp).
#pragma once

#include <ATen/core/Tensor.h>

namespace manual_layers {

// Whether linear_ce with hard (class-index) targets runs the chunked path
// (_linear_ce_chunked_fwd, csrc/generic/ce_chunked.cpp: GEMMs over row chunks, no N x C buffer) instead
// of the single pass (_linear_ce_fwd: X read once, an N x C residual kept for backward).
// x (N, D) flattened, weight (C, D). Depends on the shapes' static facts, dtype, device,
// reduction and this machine's fixed facts only, so eager calls and traced graphs choose alike;
// a symbolic N (torch.export, torch.compile(dynamic=True)) never enters the choice.
bool ce_use_chunked(const at::Tensor& x, const at::Tensor& weight, int64_t reduction);

}  // namespace manual_layers
