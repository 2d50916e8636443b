// The CPU binary loss pass's row tile, timed at run time: csrc/cpu/runtime/tile_calibration.h.
#include "tile_calibration.h"

#include <algorithm>
#include <mutex>
#include <sstream>
#include <vector>

namespace manual_layers::tile_calibration {
namespace {

struct State {
  int calls = 0;  // tickets given for calls of at least kMinBytes
  std::vector<double> times[2];  // seconds per byte, per candidate
  int choice = -1;  // -1 while undecided
};

std::mutex mu;
State states[kClasses];

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

}  // namespace

Ticket take(int cls, int vendor_candidate, int64_t x_bytes) {
  std::lock_guard<std::mutex> lock(mu);
  State& s = states[cls];
  if (s.choice >= 0) return {s.choice, -1};
  if (x_bytes < kMinBytes) return {vendor_candidate, -1};
  const int call = s.calls++;
  if (call == 0) return {vendor_candidate, -1};  // warm-up, untimed
  // then alternate, the vendor's candidate first
  const int cand = (call - 1) % 2 == 0 ? vendor_candidate : 1 - vendor_candidate;
  return {cand, cand};
}

void report(int cls, int slot, double seconds_per_byte) {
  std::lock_guard<std::mutex> lock(mu);
  State& s = states[cls];
  if (s.choice >= 0 || slot < 0) return;
  s.times[slot].push_back(seconds_per_byte);
  if (static_cast<int>(s.times[kShort].size()) >= kSamples &&
      static_cast<int>(s.times[kLong].size()) >= kSamples) {
    s.choice = median(s.times[kShort]) <= median(s.times[kLong]) ? kShort : kLong;
  }
}

std::string describe() {
  std::lock_guard<std::mutex> lock(mu);
  static const char* const rows[kClasses] = {"16", "8", "4"};
  static const char* const names[2] = {"short", "long"};
  std::ostringstream out;
  for (int c = 0; c < kClasses; ++c) {
    const State& s = states[c];
    if (c > 0) out << "; ";
    out << rows[c] << ": " << (s.choice >= 0 ? names[s.choice] : "undecided");
    out << " (";
    for (int k = 0; k < 2; ++k) {
      if (k > 0) out << ", ";
      out << names[k] << " " << s.times[k].size() << " timed";
      if (!s.times[k].empty()) out << ", median " << median(s.times[k]) * 1e9 * 1024 << " ns/KiB";
    }
    out << ")";
  }
  return out.str();
}

void reset() {
  std::lock_guard<std::mutex> lock(mu);
  for (State& s : states) s = State();
}

}  // namespace manual_layers::tile_calibration
