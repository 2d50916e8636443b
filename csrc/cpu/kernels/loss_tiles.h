// How the CPU loss pass (losses.cpp) and its dX kernel (loss_dx.cpp) cut the rows: the fixed
// row blocks, the rows per tile and the software prefetch (the CPU-vendor rule, chosen by
// CPUID), and the zero-padded acc_t copy of the weight both read. Per-ISA like them.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "../runtime/tile_calibration.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif

#ifndef CPU_CAPABILITY
#error "csrc/cpu/kernels/loss_tiles.h is for the per-ISA kernel files (-DCPU_CAPABILITY=...)"
#endif

namespace manual_layers {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

constexpr int64_t kTile = 4;                  // rows per logits step (converted/prefetched together)
constexpr int64_t kRows = 16;                 // rows per tile (at most): losses, grad_W sweep
constexpr int64_t kPrefetchBytes = 48 << 10;  // software prefetch distance (into L2)
constexpr int64_t kMinBlockRows = 2048;       // a block is at least this many rows...
constexpr int64_t kMaxBlocks = 64;            // ...and there are at most this many blocks,
constexpr int64_t kMaxPartialBytes = 64 << 20;  // whose partial grad_W total at most this.

// The fixed row partition: `count` blocks of `rows` rows (a multiple of kRows; the last block
// may be shorter or empty). Depends on the problem shape only, so results never depend on the
// number of threads.
struct Blocks {
  int64_t count;
  int64_t rows;
};

inline Blocks make_blocks(int64_t N, int64_t C, int64_t Dp, int64_t elem_size) {
  int64_t count = std::min(kMaxBlocks, (N + kMinBlockRows - 1) / kMinBlockRows);
  const int64_t per_block = std::max<int64_t>(1, C * (Dp + 1) * elem_size);
  count = std::max<int64_t>(1, std::min(count, kMaxPartialBytes / per_block));
  int64_t rows = (N + count - 1) / count;
  rows = std::max<int64_t>(kRows, (rows + kRows - 1) / kRows * kRows);
  return {count, rows};
}

// Rows per tile and software prefetch. While a tile's losses and grad_W sweep run from L1, the
// pass asks for no new line of X; by default tiles are 16 rows, with the rows ~48 KiB ahead
// prefetched into L2 meanwhile (run_block). A tile's size changes no result: every sum runs in
// row order whatever the tiles. The binary pass on rows of up to 1 KiB has a second candidate:
// the most rows, 16, 8 or 4, whose tile fits 4 KiB, and no software prefetch (the hardware
// prefetchers then keep X streaming). That one was faster on a Zen 4, slower on an Intel Xeon
// and on a Zen 3 EPYC (docs/perf-notes-from-code.md, "CPU loss pass: tile shape"), so the pass
// times both on this CPU (csrc/cpu/runtime/tile_calibration.h) and keeps the faster; until it
// has, the vendor's rule runs (AMD: the short tile; others: 16 rows with prefetch). Longer rows,
// and cross entropy (compute-bound), keep 16 rows and the prefetch.
struct TileShape {
  int64_t rows;
  bool prefetch;
  int cls = -1;   // the calibration's row-length class, and
  int slot = -1;  // >= 0: time this call and report it (tile_calibration::report)
};

// Whether this is an AMD CPU (x86 CPUID vendor string), where the short binary tiles were
// measured faster on a Zen 4: the rule used before (and without) the calibration.
inline bool cpu_is_amd() {
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
  static const bool amd = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid(0, &a, &b, &c, &d)) return false;
    return b == 0x68747541u && d == 0x69746e65u && c == 0x444d4163u;  // "AuthenticAMD"
  }();
  return amd;
#else
  return false;
#endif
}

// MANUAL_LAYERS_CPU_BINARY_TILE (read per call): auto (default: calibrated), vendor (the vendor
// rule, never timed), or ROWS[,noprefetch] (ROWS 4, 8 or 16) to force the binary pass's tiles:
// for tuning on another CPU, and for the tests, which run every tile shape on any CPU and check
// that all give the same bits. x_bytes: the bytes of X the call reads.
inline TileShape tile_shape(int64_t C, int64_t row_bytes, int64_t x_bytes) {
  bool vendor_only = false;
  if (C == 1) {
    const char* e = std::getenv("MANUAL_LAYERS_CPU_BINARY_TILE");
    if (e != nullptr && *e != '\0' && std::strcmp(e, "auto") != 0) {
      const std::string v(e);
      vendor_only = v == "vendor";
      if (!vendor_only) {
        const bool no_pf = v.size() > 11 && v.compare(v.size() - 11, 11, ",noprefetch") == 0;
        const std::string rows = no_pf ? v.substr(0, v.size() - 11) : v;
        TORCH_CHECK_VALUE(rows == "4" || rows == "8" || rows == "16",
                          "MANUAL_LAYERS_CPU_BINARY_TILE must be auto, vendor, 4, 8 or 16, the "
                          "last three optionally followed by ',noprefetch'; got '", v, "'");
        return {std::stoi(rows), !no_pf};
      }
    }
  }
  if (C != 1 || row_bytes > (1 << 10)) return {kRows, true};
  int64_t short_rows = kRows;
  while (short_rows > kTile && short_rows * row_bytes > (4 << 10)) short_rows /= 2;
  const int cls = short_rows == kRows ? 0 : short_rows == kRows / 2 ? 1 : 2;
  const auto shape = [&](int candidate) {
    return candidate == tile_calibration::kShort ? TileShape{short_rows, false}
                                                 : TileShape{kRows, true};
  };
  const int vendor = cpu_is_amd() ? tile_calibration::kShort : tile_calibration::kLong;
  if (vendor_only) return shape(vendor);
  const tile_calibration::Ticket t = tile_calibration::take(cls, vendor, x_bytes);
  TileShape out = shape(t.candidate);
  if (t.slot >= 0) out.cls = cls, out.slot = t.slot;
  return out;
}

// weight (C, D) as a contiguous acc_t (C, Dp) matrix, each row zero-padded to Dp columns (whole
// vectors): the W of the pass and of the dX kernel, which only read it. A weight that already
// is one (acc_t, contiguous, D a whole number of vectors) is used as it is; anything else is
// copied (for small problems the copy was a sizeable part of the call: zeros, a view, copy_).
inline at::Tensor padded_acc_weight(const at::Tensor& weight, int64_t Dp) {
  const int64_t C = weight.size(0), D = weight.size(1);
  const auto acc = at::toOpMathType(weight.scalar_type());
  if (D == Dp && weight.scalar_type() == acc && weight.is_contiguous()) return weight;
  at::Tensor Wp = at::zeros({C, Dp}, weight.options().dtype(acc));
  Wp.narrow(1, 0, D).copy_(weight);
  return Wp;
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace manual_layers
