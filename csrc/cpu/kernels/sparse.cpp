// CPU kernel of the fused logistic-regression loss and gradient on a CSR matrix
// (csrc/contracts/sparse.h is the contract), compiled once per ISA like csrc/cpu/kernels/losses.cpp.
//
// One pass over the non-zeros. Per row i (its entries are read from memory once):
//   1. z_i = b + sum_e v_e W^T[col_e, :], the row's entries in storage order, in acc_t;
//   2. the loss term and the residual r_i = dloss_i / dz_i (binary: vectorised over a tile of
//      16 rows, one SIMD lane per row; multinomial: vectorised over the classes, padding lanes
//      -inf so that they drop out of the softmax);
//   3. grad_W^T[col_e, :] += v_e r_i for the same entries again (they are still in L1) and
//      grad_b += r_i.
// The pass waits on its random accesses to W and grad_W, not on reading X.
// - Multinomial (a row of Cp values per entry, the classes padded to whole vectors): each block
//   keeps W^T and its own grad_W^T interleaved in one table, row j = [W^T_j | grad_W^T_j]
//   (2 Cp values), so that an entry's gather and its scatter hit the same cache lines, fetched
//   once; and the table rows of the entries a fixed distance ahead are prefetched (for writing)
//   while the current ones are summed. (Measured on the 2-core EPYC against W^T and grad_W^T as
//   two arrays, each prefetched: faster.)
// - Binary (one value per entry): the blocks read W itself and each adds into its own gradient
//   array of D values; no prefetch. Interleaved, W_j and grad_W_j share a 16-byte pair, so both
//   arrays' lines are fetched for either access, and the table is twice what the gathers need.
//   On the 2-core EPYC (AVX2), one thread, 300 interleaved passes each: 2.1 ns per entry against
//   2.9 interleaved at 20,000 x 10,000 (976,000 entries), 3.0 against 3.8 at 200,000 x 100,000
//   (9.9M entries); prefetching (both arrays, or the interleaved row) was slower at both sizes.
//
// Determinism: the rows are split into `nb` contiguous blocks of about equal work (rows plus
// non-zeros), nb and the boundaries a function of the matrix (N, nnz, crow, D, C, dtype) only,
// never of the thread count; each block accumulates its own grad_W, grad_b and (double) loss in
// row order, and those partials are summed in block order. Results are bitwise the same for any
// number of threads; no floating-point atomics. Why per-block partials rather than a transposed
// pass: X^T r by columns needs X in CSC form, a second copy of every index and value (the fit
// reads X in place). The tables cost O(nb x D x Cp) memory, independent of N, and are capped in
// total (kMaxTableBytes, about a server CPU's last-level cache: blocks running at once whose
// tables together spill it were measured slower than fewer blocks); a block is given at least
// kEntriesPerColumn entries per column of its table on average, so that setting up and summing
// its table (a few D Cp values streamed) stays a small part of its pass, whose table lines are
// otherwise fetched cold once per block.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "../../common.h"
#include "../../contracts/sparse.h"
#include "sparse_rows.h"

#ifndef CPU_CAPABILITY
#error "csrc/cpu/kernels/*.cpp are compiled per ISA with -DCPU_CAPABILITY=DEFAULT|AVX2|AVX512 (setup.py, CMakeLists.txt)"
#endif

namespace manual_layers {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

constexpr int64_t kMinBlockWork = int64_t(1) << 16;  // rows + non-zeros per block, at least
constexpr int64_t kMaxSparseBlocks = 32;                   // blocks at most,
constexpr int64_t kMaxTableBytes = int64_t(32) << 20;  // whose tables total at most this,
constexpr int64_t kEntriesPerColumn = 16;            // with this many entries per column each

// The number of row blocks: from the problem's shape only (see the file comment).
int64_t num_blocks(int64_t N, int64_t nnz, int64_t D, int64_t ts, int64_t acc_size,
                   bool need_weight) {
  int64_t nb = std::clamp<int64_t>((N + nnz) / kMinBlockWork, 1, kMaxSparseBlocks);
  if (need_weight) {
    const int64_t per_block = std::max<int64_t>(1, D * ts * acc_size);
    nb = std::min(nb, std::max<int64_t>(1, kMaxTableBytes / per_block));
    nb = std::min(nb, 1 + nnz / (kEntriesPerColumn * std::max<int64_t>(D, 1)));
  }
  // A power of two, rounded down: blocks are taken whole by the threads, so 7 blocks on 2
  // threads ran as 4 + 3 (the second thread idle for a block at the end, 12% of the pass at 20
  // classes); powers of two divide evenly among the usual thread counts (2, 4, 8, 16).
  int64_t p2 = 1;
  while (p2 * 2 <= nb) p2 *= 2;
  return p2;
}

// W (C, D) row-major into a table of row stride ts: T[j * ts + c] = W[c, j] for c < C, zeros up
// to Cp; columns lo .. hi.
template <typename acc_t>
void transpose_into(const acc_t* w, int64_t C, int64_t D, int64_t Cp, acc_t* T, int64_t ts,
                    int64_t lo, int64_t hi) {
  for (int64_t j = lo; j < hi; ++j) {
    for (int64_t c = 0; c < C; ++c) T[j * ts + c] = w[c * D + j];
    for (int64_t c = C; c < Cp; ++c) T[j * ts + c] = acc_t(0);
  }
}

// grad_W[c, j] (out, (C, D)) = sum over the nb tables, in block order, of the gradient part of
// their row j (Cp values at table + (b * D + j) * ts + goff); columns lo .. hi.
template <typename acc_t>
void reduce_into(const acc_t* tables, int64_t nb, int64_t C, int64_t D, int64_t Cp, int64_t ts,
                 int64_t goff, acc_t* out, int64_t lo, int64_t hi) {
  std::vector<acc_t> sum(Cp);
  for (int64_t j = lo; j < hi; ++j) {
    const acc_t* src = tables + j * ts + goff;
    std::copy(src, src + Cp, sum.begin());
    for (int64_t b = 1; b < nb; ++b) {
      const acc_t* pb = tables + (b * D + j) * ts + goff;
      for (int64_t c = 0; c < Cp; ++c) sum[c] += pb[c];
    }
    for (int64_t c = 0; c < C; ++c) out[c * D + j] = sum[c];
  }
}

template <typename acc_t, typename index_t>
SparseLossOut sparse_loss_impl(const int64_t* crow, const at::Tensor& col, const at::Tensor& val,
                               const at::Tensor& weight, const at::Tensor& bias,
                               const at::Tensor& target, const at::Tensor& sw, bool binary,
                               bool need_weight, bool need_bias) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t N = target.size(0), C = weight.size(0), D = weight.size(1);
  const int64_t nnz = crow[N] - crow[0];
  const auto acc_opts = val.options();
  const int64_t Cp = binary ? 1 : (C + V - 1) / V * V;
  const acc_t* w = weight.const_data_ptr<acc_t>();  // contiguous (C, D)

  Problem<acc_t, index_t> p{};
  p.crow = crow;
  p.col = col.const_data_ptr<index_t>();
  p.val = val.const_data_ptr<acc_t>();
  p.N = N, p.D = D, p.C = C, p.Cp = Cp;
  std::vector<acc_t> bias_p;
  if (bias.defined()) {
    bias_p.assign(Cp, acc_t(0));
    const acc_t* bp = bias.const_data_ptr<acc_t>();
    std::copy(bp, bp + C, bias_p.begin());
    p.bias = bias_p.data();
  }
  if (binary) p.y = target.const_data_ptr<acc_t>();
  else p.t = target.const_data_ptr<int64_t>();
  p.sw = sw.defined() ? sw.const_data_ptr<acc_t>() : nullptr;

  // A block's table row per column: [W^T_j | grad_W^T_j] (multinomial), grad_W_j (binary);
  // goff: where the gradient part starts in it.
  const int64_t ts = binary ? 1 : 2 * Cp, goff = binary ? 0 : Cp;
  // Row blocks of about equal work (rows + non-zeros), boundaries from crow alone.
  const int64_t nb = num_blocks(N, nnz, D, ts, sizeof(acc_t), need_weight);
  std::vector<int64_t> bounds(nb + 1, N);
  bounds[0] = 0;
  const int64_t total = nnz + N;
  for (int64_t b = 1; b < nb; ++b) {
    const int64_t goal = total / nb * b + total % nb * b / nb;
    int64_t lo = 0, hi = N;  // first row r with (crow[r] - crow[0]) + r >= goal
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if ((crow[mid] - crow[0]) + mid < goal) lo = mid + 1;
      else hi = mid;
    }
    bounds[b] = lo;
  }

  // Without the gradient the blocks share W^T (binary: W itself); with it each block builds its
  // table (D, ts) in its own thread, and one block alone also writes grad_W: the whole op is
  // then one task, with no parallel region to wait on (on a loaded machine every region can
  // wait a scheduler slice for a descheduled worker).
  at::Tensor Wt;
  if (!need_weight && !binary) {
    Wt = at::empty({D, Cp}, acc_opts);
    acc_t* wt = Wt.mutable_data_ptr<acc_t>();
    at::parallel_for(0, D, 4096, [&](int64_t lo, int64_t hi) {
      transpose_into(w, C, D, Cp, wt, Cp, lo, hi);
    });
  }
  const acc_t* wt = need_weight ? nullptr : (binary ? w : Wt.const_data_ptr<acc_t>());
  p.prefetch = !binary && D * (need_weight ? ts : Cp) * static_cast<int64_t>(sizeof(acc_t)) >
                             kPrefetchFromBytes;
  // The tables from the CPU output cache: fresh memory each call (22 MiB at 20 classes x
  // 10,000 columns, 7 blocks) page-faulted on every evaluation of a fit (about 4% of it).
  at::Tensor tables = need_weight ? empty_for_write({nb, D, ts}, acc_opts) : at::Tensor();
  acc_t* tp = need_weight ? tables.mutable_data_ptr<acc_t>() : nullptr;
  at::Tensor grad_w = need_weight ? at::empty({C, D}, acc_opts) : at::empty({0}, acc_opts);
  std::vector<acc_t> part_b(nb * Cp, acc_t(0));
  std::vector<double> part_loss(nb, 0.0);
  std::vector<char> part_bad(nb, 0);
  // The threads take blocks from a shared counter rather than a fixed share each: a thread
  // that the OS deschedules (a busy machine) then holds up only the block it is in, while the
  // others take the rest. Which thread runs a block changes no result.
  std::atomic<int64_t> next_block{0};
  const int64_t n_workers = std::min<int64_t>(nb, at::get_num_threads());
  at::parallel_for(0, n_workers, 1, [&](int64_t, int64_t) {
    for (int64_t b = next_block++; b < nb; b = next_block++) {
      Table<acc_t> T{wt, nullptr, Cp};
      acc_t* tb = nullptr;
      if (need_weight && binary) {
        tb = tp + b * D;
        std::fill(tb, tb + D, acc_t(0));
        T = Table<acc_t>{w, tb, 1};
      } else if (need_weight) {
        tb = tp + b * D * ts;
        transpose_into(w, C, D, Cp, tb, ts, 0, D);
        for (int64_t j = 0; j < D; ++j) std::fill(tb + j * ts + Cp, tb + (j + 1) * ts, acc_t(0));
        T = Table<acc_t>{tb, tb + Cp, ts};
      }
      bool bad = false;
      run_block(p, T, bounds[b], bounds[b + 1], part_b.data() + b * Cp, part_loss[b], bad);
      part_bad[b] = bad;
      if (need_weight && nb == 1) {
        reduce_into(tp, 1, C, D, Cp, ts, goff, grad_w.mutable_data_ptr<acc_t>(), 0, D);
      }
    }
  });
  for (int64_t b = 0; b < nb; ++b) {
    TORCH_CHECK_INDEX(!part_bad[b], "manual_layers._sparse_linear_loss_fwd: col_indices holds "
                      "a column index outside [0, ", D, ") (weight has ", D, " columns)");
  }
  if (need_weight && nb > 1) {
    // grad_W (C, D) = the tables' gradient halves summed in block order, transposed.
    acc_t* out = grad_w.mutable_data_ptr<acc_t>();
    at::parallel_for(0, D, 512, [&](int64_t lo, int64_t hi) {
      reduce_into(tp, nb, C, D, Cp, ts, goff, out, lo, hi);
    });
  }

  double loss_sum = 0;
  for (double l : part_loss) loss_sum += l;
  at::Tensor loss = at::empty({}, acc_opts).fill_(loss_sum);
  at::Tensor grad_b = at::empty({0}, acc_opts);
  if (need_bias) {
    grad_b = at::empty({C}, acc_opts);
    acc_t* out = grad_b.mutable_data_ptr<acc_t>();
    for (int64_t c = 0; c < C; ++c) {
      acc_t s = part_b[c];
      for (int64_t b = 1; b < nb; ++b) s += part_b[b * Cp + c];
      out[c] = s;
    }
  }
  return {loss, grad_w, grad_b};
}

}  // namespace

SparseLossOut sparse_linear_loss_fwd_cpu(const at::Tensor& crow_indices,
                                         const at::Tensor& col_indices, const at::Tensor& values,
                                         const at::Tensor& weight,
                                         const c10::optional<at::Tensor>& bias,
                                         const at::Tensor& target,
                                         const c10::optional<at::Tensor>& sample_weight,
                                         bool need_weight, bool need_bias) {
  constexpr const char* op = "manual_layers._sparse_linear_loss_fwd";
  auto is_index = [](const at::Tensor& t) {
    return t.scalar_type() == at::kInt || t.scalar_type() == at::kLong;
  };
  TORCH_CHECK(crow_indices.dim() == 1 && crow_indices.size(0) >= 1 && is_index(crow_indices), op,
              ": crow_indices must be a 1-D int32 or int64 tensor of N + 1 row offsets, got ",
              crow_indices.scalar_type(), " of shape ", crow_indices.sizes());
  TORCH_CHECK(col_indices.dim() == 1 && is_index(col_indices), op,
              ": col_indices must be a 1-D int32 or int64 tensor, got ",
              col_indices.scalar_type(), " of shape ", col_indices.sizes());
  TORCH_CHECK(values.dim() == 1 && values.size(0) == col_indices.size(0), op,
              ": values must be 1-D with one value per column index (", col_indices.size(0),
              "), got shape ", values.sizes());
  TORCH_CHECK(at::isFloatingType(values.scalar_type()), op,
              ": values must be a floating tensor, got ", values.scalar_type());
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D (C, D), got shape ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == values.scalar_type(), op,
              ": values and weight must have one dtype, got ", values.scalar_type(), " and ",
              weight.scalar_type());
  for (const at::Tensor* t : {&crow_indices, &col_indices, &values, &weight, &target}) {
    TORCH_CHECK(t->device().is_cpu(), op, ": every tensor must be on the CPU here, got ",
                t->device());
  }
  const int64_t N = crow_indices.size(0) - 1, C = weight.size(0), D = weight.size(1);
  TORCH_CHECK(target.dim() == 1 && target.size(0) == N, op, ": target must have shape (", N,
              ",) (one per row of X), got ", target.sizes());
  const bool binary = at::isFloatingType(target.scalar_type());
  TORCH_CHECK(binary || target.scalar_type() == at::kLong, op,
              ": target must be floating (binary, probabilities) or int64 class indices "
              "(multinomial), got ", target.scalar_type());
  TORCH_CHECK(!binary || C == 1, op, ": a floating (binary) target needs weight of shape (1, ",
              D, "), got ", weight.sizes());
  TORCH_CHECK(binary || C >= 1, op, ": weight must have at least one row, got ", weight.sizes());
  const bool has_b = bias.has_value() && bias->defined();
  const bool has_sw = sample_weight.has_value() && sample_weight->defined();
  if (has_b) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == C && bias->device().is_cpu(), op,
                ": bias must have shape (", C, ",) on the CPU, got ", bias->sizes());
  }
  if (has_sw) {
    TORCH_CHECK(sample_weight->dim() == 1 && sample_weight->size(0) == N &&
                    sample_weight->device().is_cpu(),
                op, ": sample_weight must have shape (", N, ",) on the CPU, got ",
                sample_weight->sizes());
  }

  // Row offsets as int64 (int32 crow widened in a plain loop, N + 1 values: ATen's copy would
  // open a parallel region for it), checked: non-decreasing, within the entries.
  std::vector<int64_t> crow_wide;
  const at::Tensor crow = crow_indices.contiguous();
  const int64_t* cp = nullptr;
  if (crow.scalar_type() == at::kLong) {
    cp = crow.const_data_ptr<int64_t>();
  } else {
    const int32_t* c32 = crow.const_data_ptr<int32_t>();
    crow_wide.assign(c32, c32 + N + 1);
    cp = crow_wide.data();
  }
  const int64_t nnz_all = values.size(0);
  TORCH_CHECK_VALUE(cp[0] >= 0 && cp[N] <= nnz_all, op, ": crow_indices must lie in [0, ",
                    nnz_all, "] (the number of values), got first ", cp[0], " and last ", cp[N]);
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK_VALUE(cp[i] <= cp[i + 1], op, ": crow_indices must be non-decreasing, got ",
                      cp[i], " then ", cp[i + 1], " at row ", i);
  }

  // The accumulation type: double for double values, float otherwise (16-bit values widened).
  const auto acc = at::toOpMathType(values.scalar_type());
  const at::Tensor val = values.to(acc).contiguous();
  const at::Tensor col = col_indices.contiguous();
  const at::Tensor w = weight.to(acc).contiguous();
  const at::Tensor b = has_b ? bias->to(acc).contiguous() : at::Tensor();
  const at::Tensor sw = has_sw ? sample_weight->to(acc).contiguous() : at::Tensor();
  at::Tensor tgt;
  if (binary) {
    tgt = target.to(acc).contiguous();
  } else {
    tgt = target.contiguous();
    const int64_t* tp = tgt.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < N; ++i) {
      TORCH_CHECK_INDEX(tp[i] >= 0 && tp[i] < C, op, ": target ", tp[i], " of row ", i,
                        " is out of bounds for ", C, " classes");
    }
  }

  SparseLossOut out;
  AT_DISPATCH_FLOATING_TYPES(acc, "sparse_linear_loss_fwd_cpu", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_INDEX_TYPES(col.scalar_type(), "sparse_linear_loss_fwd_cpu", [&] {
      out = sparse_loss_impl<acc_t, index_t>(cp, col, val, w, b, tgt, sw, binary, need_weight,
                                             need_bias);
    });
  });
  return out;
}

}  // namespace CPU_CAPABILITY
}  // namespace manual_layers
