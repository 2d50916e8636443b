// CPU kernels of the fused logistic-regression losses (csrc/contracts/losses.h):
//   binary:      BCE-with-logits of z = x w^T + b   (C == 1)
//   multinomial: cross-entropy of z = x W^T + b     (C classes)
//
// Single pass over X. Reading X is the cost (plain PyTorch reads it twice: the forward GEMV/GEMM
// and then X^T r in backward), so each row of X is read from memory exactly once and everything
// that needs it is done while it is in L1:
//
//   rows are split into a FIXED number of contiguous blocks (a function of N, C and D only, never
//   of the thread count); at::parallel_for runs over the blocks. Within a block, per tile of
//   kRows (16) rows (the binary pass on rows of up to 1 KiB: 16, 8 or 4, timed on this CPU,
//   see tile_shape):
//     1. z = W x_i + b for the tile's rows, one row after another, each read front to back
//        (up to 4 classes per register block; vectorised, accumulation type acc_t: float for
//        float/bf16/half, double for double; W is kept as a zero-padded acc_t copy), with the
//        rows ~48 KiB ahead prefetched into L2 where tile_shape asks for it;
//     2. the loss terms and residuals r_i = dloss_i/dz_i of the tile, vectorised over its rows
//        (one SIMD lane per row: stable softplus / log-sum-exp), the residual multiplied by the
//        reduction's scale (1/N, 1/sum_w or 1), the losses accumulated in double in row order;
//     3. one sweep over the tile, a register-blocked micro-GEMM grad_W += R^T X_tile into the
//        block's partial grad_W (C x D acc_t, small enough to stay in cache: loaded and stored
//        once per tile, the rows added in order), and r_i into its partial grad_b; when x needs
//        a gradient, r_i (N x C, acc_t) is kept for backward, which writes
//        dX = (grad_output r) W (csrc/contracts/losses.h says why dX is not written here).
//   Tiles of 16 rows (not 4) let the loss's exp/log run on full vectors and move grad_W through
//   registers a quarter as often; rows are read one at a time, with prefetch into L2 (the
//   measurements behind these choices: docs/perf-notes-from-code.md, "CPU loss pass").
//   The block partials (loss, grad_W, grad_b) are then summed in block order: bitwise
//   deterministic from run to run, whatever the thread count, no atomics. Temporary memory is
//   O(blocks x C x D), independent of N.
//
// reduction="none" runs the same pass, writing the per-row loss and the unscaled residual (N, C);
// its backward, _linear_loss_bwd (csrc/generic/loss_bwd.cpp), is three GEMMs through ATen.
//
// This file holds the pass and the two ops' entries; its pieces: loss_tiles.h (row blocks, tile
// shape and the CPU-vendor rule), loss_terms.h (the loss terms), loss_rows.h (the logits of a row
// and the grad_W sweep); the dX kernel for small C is loss_dx.cpp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "../../checks.h"
#include "../../common.h"
#include "../../contracts/losses.h"
#include "loss_rows.h"
#include "loss_terms.h"
#include "loss_tiles.h"
#include "vec_io.h"

// Compiled once per ISA (csrc/cpu/runtime/dispatch.cpp explains the dispatch): everything below lives in
// manual_layers::CPU_CAPABILITY (DEFAULT, AVX2 or AVX512), registered by csrc/cpu/runtime/dispatch.cpp.
#ifndef CPU_CAPABILITY
#error "csrc/cpu/kernels/*.cpp are compiled per ISA with -DCPU_CAPABILITY=DEFAULT|AVX2|AVX512 (setup.py, CMakeLists.txt)"
#endif

namespace manual_layers {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// ---------------------------------------------------------------------------------------------
// The pass.

template <typename scalar_t, typename acc_t>
struct Pass {
  // inputs
  const scalar_t* x;  // row i at x + i * x_row_stride, unit column stride
  int64_t x_row_stride;
  int64_t N, D, Dp, C;  // Dp: D rounded up to the vector width
  const acc_t* W;  // (C, Dp), zero-padded
  const acc_t* bias;  // (C,) or null
  acc_t scale;  // applied to the residual before accumulation (mean/sum)
  Blocks blocks;
  TileShape tile;
  // mean/sum outputs
  double* part_loss;  // (blocks,)
  acc_t* part_w;  // (blocks, C, Dp) or null
  acc_t* part_b;  // (blocks, C) or null
  acc_t* residual;  // (N, C) or null: mean/sum scaled by `scale` (need_x), none unscaled
  // reduction="none" outputs
  bool none_mode;
  acc_t* row_loss;  // (N,)
};

// T: rows per tile (p.tile.rows), a compile-time constant: as a run-time value the 4-row tiles'
// loops (the loss's vector, the residual scaling, the sweep's row loop) cost the time the small
// tiles save (measured: docs/perf-notes-from-code.md, "CPU loss pass").
template <typename scalar_t, typename acc_t, bool NEED_W, int64_t T, typename LossFn>
void run_block(const Pass<scalar_t, acc_t>& p, const LossFn& loss_fn, int64_t blk) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  static_assert(T % kTile == 0 && T <= kRows && kRows % V == 0,
                "tiles of whole register blocks, buffers of whole vectors");
  const bool prefetch = p.tile.prefetch;
  const int64_t C = p.C, D = p.D, Dp = p.Dp;
  const int64_t begin = std::min(p.N, blk * p.blocks.rows);
  const int64_t end = std::min(p.N, begin + p.blocks.rows);
  const bool none_mode = p.none_mode;

  acc_t* gw = NEED_W ? p.part_w + blk * C * Dp : nullptr;
  acc_t* gb = p.part_b ? p.part_b + blk * C : nullptr;
  if (gw) std::fill(gw, gw + C * Dp, acc_t(0));
  if (gb) std::fill(gb, gb + C, acc_t(0));

  // Whole tiles of acc_t rows are read in place, any D (a row's last partial vector is a masked
  // load: float64 200,000 x 100 binary loss+grad, D not a multiple of 8, no longer copies every
  // row); so are whole tiles of 16-bit rows in the binary pass, converted as loaded (below). The
  // other 16-bit tiles and the last, short tile are converted / copied into a zero-padded acc_t
  // tile, padded with zero rows (and zero residuals).
  std::vector<acc_t> xbuf(T * Dp, acc_t(0));
  std::vector<acc_t> z(kRows * C), r(kRows * C);  // class-major: [c * kRows + k]
  acc_t tile_loss[kRows];
  double loss_sum = 0;

  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(scalar_t));
  // Software prefetch distance in rows, where tile_shape asks for prefetch: kPrefetchBytes
  // ahead, into L2 (any distance from 16 to 128 KiB did as well; into L1, or 8 rows ahead, did
  // worse than none: docs/perf-notes-from-code.md).
  const int64_t pf_rows =
      std::max<int64_t>(kTile, (kPrefetchBytes + row_bytes - 1) / std::max<int64_t>(row_bytes, 1));
  for (int64_t i0 = begin; i0 < end; i0 += T) {
    const int64_t nr = std::min(T, end - i0);
    const int64_t kr = (nr + kTile - 1) / kTile * kTile;  // rows the register blocks cover
    // The tile's rows x_k = xt + k * xs: in place (a whole tile of acc_t rows), or converted /
    // copied into xbuf with zero rows after the last one. Binary: a whole tile is read in place
    // whatever x's dtype (`direct`, rows x_k = p.x + (i0 + k) * x_row_stride), 16-bit values
    // converted in registers as they are loaded, by the logits and again by the sweep (from
    // L1): writing the tile to xbuf and reading it back set the 16-bit pass's speed
    // (docs/perf-notes-from-code.md).
    const bool in_place = std::is_same_v<scalar_t, acc_t> && nr == T;
    const bool direct = C == 1 && nr == T;
    const acc_t* xt = in_place ? reinterpret_cast<const acc_t*>(p.x + i0 * p.x_row_stride)
                               : xbuf.data();
    const int64_t xs = in_place ? p.x_row_stride : Dp;
    const scalar_t* x_tile = p.x + i0 * p.x_row_stride;
    // 1. logits, one register block of kTile rows at a time.
    for (int64_t k0 = 0; k0 < kr; k0 += kTile) {
      // Reading X sets the pass's speed, and the hardware prefetcher idles while a tile's
      // losses and grad_W sweep run from L1: where tile_shape says so, ask for the rows pf_rows
      // ahead (into L2, so the tile in L1 is not evicted) so that memory stays busy meanwhile.
      // Binary rows read in place: one prefetch per line, issued as this row's same line is
      // read (logits_block_binary), not a burst of kTile rows' lines here, which was faster for
      // the binary pass and slower for cross entropy (compute-bound), which keeps the burst
      // (docs/perf-notes-from-code.md).
      const bool spread = prefetch && direct && i0 + pf_rows + k0 + kTile <= end;
      for (int64_t k = k0; prefetch && !spread && k < k0 + kTile && i0 + pf_rows + k < end; ++k) {
        const char* row = reinterpret_cast<const char*>(p.x + (i0 + pf_rows + k) * p.x_row_stride);
        for (int64_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(row + off, 0, 2);
      }
      if (!in_place && !direct) {
        for (int64_t k = k0; k < k0 + kTile; ++k) {
          acc_t* row = xbuf.data() + k * Dp;
          if (k >= nr) std::fill(row, row + D, acc_t(0));
          else convert_row(p.x + (i0 + k) * p.x_row_stride, row, D);
        }
      }
      if (direct) {
        const int64_t row_stride_bytes = p.x_row_stride * static_cast<int64_t>(sizeof(scalar_t));
        const scalar_t* rows = x_tile + k0 * p.x_row_stride;
        if (spread) {
          logits_block_binary<true>(rows, p.x_row_stride, p.W, p.bias, D, z.data() + k0,
                                    reinterpret_cast<const char*>(rows + pf_rows * p.x_row_stride),
                                    row_stride_bytes);
        } else {
          logits_block_binary<false>(rows, p.x_row_stride, p.W, p.bias, D, z.data() + k0,
                                     nullptr, 0);
        }
      } else {
        logits_block(xt + k0 * xs, xs, p.W, p.bias, C, D, Dp, z.data() + k0);
      }
    }
    for (int64_t k = kr; k < T; ++k)  // lanes no register block covered: finite padding
      for (int64_t c = 0; c < C; ++c) z[c * kRows + k] = acc_t(0);

    // 2. losses and residuals of the tile's rows; padding lanes get zero residuals.
    loss_fn.tile(i0, nr, T, z.data(), r.data(), tile_loss);
    for (int64_t c = 0; c < C; ++c)
      std::fill(r.data() + c * kRows + nr, r.data() + c * kRows + T, acc_t(0));
    if (none_mode) {
      for (int64_t k = 0; k < nr; ++k) p.row_loss[i0 + k] = tile_loss[k];
    } else {
      for (int64_t k = 0; k < nr; ++k) loss_sum += static_cast<double>(tile_loss[k]);
      for (int64_t c = 0; c < C; ++c)
        for (int64_t j = c * kRows; j < c * kRows + T; j += V)
          (Vec::loadu(r.data() + j) * Vec(p.scale)).store(r.data() + j);
    }
    if (p.residual) {
      for (int64_t k = 0; k < nr; ++k)
        for (int64_t c = 0; c < C; ++c) p.residual[(i0 + k) * C + c] = r[c * kRows + k];
    }
    if (none_mode) continue;

    if (gb) {
      for (int64_t c = 0; c < C; ++c)
        for (int64_t k = 0; k < nr; ++k) gb[c] += r[c * kRows + k];
    }

    // 3. one sweep over the tile: grad_W += R^T X_tile as a register-blocked micro-GEMM
    //    (2 classes x 4 feature vectors per block), the rows added in order: grad_W is loaded
    //    and stored once per tile, not once per row.
    if constexpr (NEED_W) {
      if (direct) sweep_tile(r.data(), x_tile, p.x_row_stride, kr, gw, C, D, Dp);
      else sweep_tile(r.data(), xt, xs, kr, gw, C, D, Dp);
    }
  }
  if (!none_mode) p.part_loss[blk] = loss_sum;
}

template <typename scalar_t, typename acc_t, bool NEED_W, typename LossFn>
void run_pass(const Pass<scalar_t, acc_t>& p, const LossFn& loss_fn) {
  at::parallel_for(0, p.blocks.count, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      // Only the binary pass takes tiles of fewer than kRows rows (tile_shape).
      if constexpr (std::is_same_v<LossFn, BceLoss<acc_t>>) {
        if (p.tile.rows == kTile) {
          run_block<scalar_t, acc_t, NEED_W, kTile>(p, loss_fn, b);
          continue;
        }
        if (p.tile.rows == 2 * kTile) {
          run_block<scalar_t, acc_t, NEED_W, 2 * kTile>(p, loss_fn, b);
          continue;
        }
      }
      TORCH_INTERNAL_ASSERT(p.tile.rows == kRows);
      run_block<scalar_t, acc_t, NEED_W, kRows>(p, loss_fn, b);
    }
  });
}

// Sums `count` partials of n elements each (laid out one after another) in block order.
template <typename acc_t>
void reduce_partials(const acc_t* part, int64_t count, int64_t n, acc_t* out) {
  at::parallel_for(0, n, 4096, [&](int64_t lo, int64_t hi) {
    std::copy(part + lo, part + hi, out + lo);
    for (int64_t b = 1; b < count; ++b) {
      const acc_t* pb = part + b * n;
      for (int64_t j = lo; j < hi; ++j) out[j] += pb[j];
    }
  });
}

// Everything shared by the two losses: argument preparation, the pass, the reductions and the
// outputs. `make_loss` builds the per-tile loss functor for the acc_t in use; `denominator`
// is the mean's divisor (N, or the class-weight sum of the non-ignored rows).
template <typename MakeLoss>
LossOut fused_loss(const at::Tensor& x_in, const at::Tensor& weight,
                   const c10::optional<at::Tensor>& bias, int64_t reduction, double denominator,
                   bool need_x, bool need_weight, bool need_bias, const MakeLoss& make_loss) {
  const int64_t N = x_in.size(0), D = x_in.size(1), C = weight.size(0);
  // Rows must have unit column stride; any row stride is read in place.
  const at::Tensor x = x_in.stride(1) == 1 || D <= 1 ? x_in : x_in.contiguous();
  const auto opts = x.options();
  const auto acc_opts = opts.dtype(at::toOpMathType(x.scalar_type()));
  // Each output that is not computed is its own empty tensor: outputs must not alias.
  auto none = [&] { return at::empty({0}, acc_opts); };
  const bool any_grad = need_x || need_weight || need_bias;

  at::Tensor loss, grad_w = none(), grad_b = none(), residual = none();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "linear_loss_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int64_t V = Vectorized<acc_t>::size();
    const int64_t Dp = (D + V - 1) / V * V;

    const at::Tensor Wp = padded_acc_weight(weight, Dp);
    at::Tensor b_acc;
    if (bias.has_value() && bias->defined()) b_acc = bias->to(acc_opts.dtype()).contiguous();

    const auto loss_fn = make_loss(acc_t());
    Pass<scalar_t, acc_t> p{};
    p.x = x.const_data_ptr<scalar_t>();
    p.x_row_stride = x.stride(0);
    p.N = N, p.D = D, p.Dp = Dp, p.C = C;
    p.W = Wp.const_data_ptr<acc_t>();
    p.bias = b_acc.defined() ? b_acc.const_data_ptr<acc_t>() : nullptr;
    // Short tiles exist for the binary pass only (run_pass); a cross entropy with C = 1 has the
    // binary pass's C but runs the 16-row tiles.
    constexpr bool kBinaryPass = std::is_same_v<std::decay_t<decltype(loss_fn)>, BceLoss<acc_t>>;
    const int64_t row_bytes = D * static_cast<int64_t>(sizeof(scalar_t));
    p.tile = kBinaryPass ? tile_shape(C, row_bytes, N * row_bytes) : TileShape{kRows, true};
    // a call the tile calibration asked to time (loss_tiles.h, tile_shape)
    const auto timed = [&](auto&& pass) {
      if (p.tile.slot < 0) return pass();
      const auto t0 = std::chrono::steady_clock::now();
      pass();
      const std::chrono::duration<double> dt = std::chrono::steady_clock::now() - t0;
      tile_calibration::report(p.tile.cls, p.tile.slot,
                               dt.count() / static_cast<double>(N * row_bytes));
    };

    if (reduction == kNone) {
      loss = at::empty({N}, acc_opts);
      p.none_mode = true;
      p.row_loss = loss.mutable_data_ptr<acc_t>();
      if (any_grad) {
        residual = empty_for_write({N, C}, acc_opts);
        p.residual = residual.mutable_data_ptr<acc_t>();
      }
      p.blocks = make_blocks(N, 0, 0, 0);  // no partials in this mode
      timed([&] { run_pass<scalar_t, acc_t, false>(p, loss_fn); });
      return;
    }

    // mean / sum: a zero denominator (empty batch, every row ignored) gives a NaN loss, as in
    // torch, and zero gradients.
    const double div = reduction == kMean ? denominator : 1.0;
    p.scale = div == 0.0 ? acc_t(0) : static_cast<acc_t>(1.0 / div);
    p.blocks = make_blocks(N, need_weight ? C : 0, Dp, sizeof(acc_t));
    const int64_t nb = p.blocks.count;
    std::vector<double> part_loss(nb, 0.0);
    p.part_loss = part_loss.data();
    at::Tensor part_w, part_b;
    if (need_weight) {
      part_w = at::empty({nb, C, Dp}, acc_opts);
      p.part_w = part_w.mutable_data_ptr<acc_t>();
    }
    if (need_bias) {
      part_b = at::empty({nb, C}, acc_opts);
      p.part_b = part_b.mutable_data_ptr<acc_t>();
    }
    if (need_x) {
      residual = empty_for_write({N, C}, acc_opts);
      p.residual = residual.mutable_data_ptr<acc_t>();
    }

    timed([&] {
      if (need_weight) run_pass<scalar_t, acc_t, true>(p, loss_fn);
      else run_pass<scalar_t, acc_t, false>(p, loss_fn);
    });

    double total = 0;
    for (double l : part_loss) total += l;
    total = div == 0.0 ? std::numeric_limits<double>::quiet_NaN() : total / div;
    loss = at::empty({}, acc_opts).fill_(total);

    if (need_weight) {
      at::Tensor gw = at::empty({C, Dp}, acc_opts);
      reduce_partials(part_w.const_data_ptr<acc_t>(), nb, C * Dp, gw.mutable_data_ptr<acc_t>());
      grad_w = Dp == D ? gw : gw.narrow(1, 0, D).contiguous();
    }
    if (need_bias) {
      grad_b = at::empty({C}, acc_opts);
      reduce_partials(part_b.const_data_ptr<acc_t>(), nb, C, grad_b.mutable_data_ptr<acc_t>());
    }
  });
  return {loss, grad_w, grad_b, residual};
}

}  // namespace

LossOut linear_bce_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                           const c10::optional<at::Tensor>& pos_weight,
                           const c10::optional<at::Tensor>& sample_weight, int64_t reduction,
                           bool need_x, bool need_weight, bool need_bias) {
  const char* op = kBceKernelOp;
  check_linear_args(op, x, weight, bias);
  check_reduction(reduction);
  check_bce_kernel_args(op, x, weight, target, pos_weight, sample_weight);
  const int64_t N = x.size(0);
  const bool has_pw = has(pos_weight);
  const bool has_sw = has(sample_weight);
  const auto acc_dtype = at::toOpMathType(x.scalar_type());
  const at::Tensor y = target.to(acc_dtype).contiguous();
  const at::Tensor sw = has_sw ? sample_weight->to(acc_dtype).contiguous() : at::Tensor();
  const double pw = has_pw ? pos_weight->item<double>() : 1.0;

  return fused_loss(x, weight, bias, reduction, static_cast<double>(N), need_x, need_weight,
                    need_bias, [&](auto acc_zero) {
                      using acc_t = decltype(acc_zero);
                      return BceLoss<acc_t>{y.const_data_ptr<acc_t>(),
                                           has_sw ? sw.const_data_ptr<acc_t>() : nullptr,
                                           static_cast<acc_t>(pw)};
                    });
}

LossOut linear_ce_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                          const c10::optional<at::Tensor>& class_weight, int64_t ignore_index,
                          double label_smoothing, int64_t reduction, bool need_x,
                          bool need_weight, bool need_bias) {
  const char* op = kCeKernelOp;
  check_linear_args(op, x, weight, bias);
  check_reduction(reduction);
  check_ce_kernel_args(op, x, weight, target, class_weight, label_smoothing);
  const int64_t N = x.size(0), C = weight.size(0);
  const bool has_cw = has(class_weight);
  const auto acc_dtype = at::toOpMathType(x.scalar_type());
  const at::Tensor t = target.contiguous();
  const at::Tensor cw = has_cw ? class_weight->to(at::kDouble).contiguous() : at::Tensor();
  const at::Tensor cw_acc = has_cw ? class_weight->to(acc_dtype).contiguous() : at::Tensor();

  // Cheap first pass over the targets: range check, and the mean's denominator
  // sum_{i not ignored} w_{t_i}.
  const int64_t* tp = t.const_data_ptr<int64_t>();
  const double* cwp = has_cw ? cw.const_data_ptr<double>() : nullptr;
  double weight_total = 0;
  for (int64_t i = 0; i < N; ++i) {
    const int64_t ti = tp[i];
    if (ti == ignore_index) continue;
    TORCH_CHECK_INDEX(ti >= 0 && ti < C, "Target ", ti, " is out of bounds.");
    weight_total += cwp ? cwp[ti] : 1.0;
  }
  double class_weight_sum = static_cast<double>(C);
  if (has_cw) {
    class_weight_sum = 0;
    for (int64_t c = 0; c < C; ++c) class_weight_sum += cwp[c];
  }

  return fused_loss(x, weight, bias, reduction, weight_total, need_x, need_weight, need_bias,
                    [&](auto acc_zero) {
                      using acc_t = decltype(acc_zero);
                      return CeLoss<acc_t>{tp,
                                          has_cw ? cw_acc.const_data_ptr<acc_t>() : nullptr,
                                          C,
                                          ignore_index,
                                          static_cast<acc_t>(label_smoothing),
                                          static_cast<acc_t>(class_weight_sum)};
                    });
}

}  // namespace CPU_CAPABILITY
}  // namespace manual_layers
