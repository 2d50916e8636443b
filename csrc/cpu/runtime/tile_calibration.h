// The CPU binary loss pass's row tile, chosen by timing it on this CPU (issue 28, item 4).
//
// Rows of up to 1 KiB have two candidate tiles (csrc/cpu/kernels/loss_tiles.h, tile_shape): the
// most rows (16, 8 or 4) whose tile fits 4 KiB without software prefetch ("short"), and 16 rows
// with the rows ~48 KiB ahead prefetched into L2 ("long"). Which is faster depends on the CPU,
// not on its vendor: short won on a Zen 4 (docs/perf-notes-from-code.md), long on a Xeon and on
// a Zen 3 EPYC (AVX2), where short was 1.2-1.4x slower. The tile changes no result bit (every sum
// runs in row order whatever the tile; tests/ops/test_losses.py checks it), so the pass can time
// both on the caller's own data: per row-length class (the short tile's rows), the first call of
// at least kMinBytes of X runs the vendor's rule untimed (first touches, the thread pool
// starting), the next ones alternate the two candidates, timed, until each has kSamples; then
// the one with the lower median time per byte is kept for the rest of the process. Smaller calls
// run the vendor's rule until then (AMD: short; others: long).
//
// ISA-neutral, one state per process, behind a mutex (calls take milliseconds; fits on several
// threads may call at once, which only adds noise to the timings).
#pragma once

#include <cstdint>
#include <string>

namespace manual_layers::tile_calibration {

constexpr int kShort = 0;  // the short tile without prefetch
constexpr int kLong = 1;   // 16 rows with prefetch
constexpr int kClasses = 3;  // row-length classes: short tiles of 16, 8, 4 rows
constexpr int64_t kMinBytes = int64_t(8) << 20;  // calls timed: X of at least this many bytes
constexpr int kSamples = 3;  // timed calls per candidate

// Which candidate a call of `x_bytes` bytes of X in row-length class `cls` runs; slot >= 0:
// time it and report() it.
struct Ticket {
  int candidate;
  int slot;
};
Ticket take(int cls, int vendor_candidate, int64_t x_bytes);
void report(int cls, int slot, double seconds_per_byte);

// "16: long (short 0.91 ns/KiB, long 0.62 ...); 8: undecided (...)": for tests and tuning,
// manual_layers._C.cpu_tile_calibration(); reset() forgets every decision (tests).
std::string describe();
void reset();

}  // namespace manual_layers::tile_calibration
