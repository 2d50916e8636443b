// Host emulation of CUDA kernels that could not be run on a GPU when they were written, so that
// their indexing, shared-memory layout, fragment addressing, pipeline ring and reductions are
// checked on machines without one (tests/test_cuda_emu.py builds and runs this with g++):
//   ce_tc    the tensor-core cross-entropy kernel (csrc/cuda/logreg_ce_tc.cu)
//   loss_dx  the losses' dX kernel for few classes (csrc/cuda/loss_dx.cu)
//
// The .cu files are compiled as C++ with ML_CUDA_HOST_EMU: a block's 256 threads are
// std::threads (blocks run one after another), __syncthreads and the warp shuffles are
// barriers, cp.async is a synchronous copy (or zero fill), and mma.sync is computed from the
// fragment layouts of the PTX ISA, written here independently of the kernel (m16n8k16 16-bit:
// A[g + 8 (r % 2)][2t + 8 (r / 2) + h] in register r of lane 4g + t, B[2t + 8r + h][g],
// D[g + 8 (r / 2)][2t + r % 2]; m16n8k8 tf32 likewise with k = t + 4 (r / 2) and t + 4r).
// What it cannot check: the PTX itself, timing, and races between asynchronous copies and
// their readers (the waits are no-ops here).
//
// Usage (exit 0 when every output matches a float64 reference of the same inputs, else 1):
//   kernels_emu ce_tc DTYPE N D C GRID STAGES OPTS   DTYPE bf16|f16|f32; OPTS a subset of
//       "wWsi" (class weights in [0.1, 2] or up to 3e4, label smoothing, ignored rows) or "-"
//   kernels_emu loss_dx DTYPE N D C THREADS PER_ROW  DTYPE bf16|f16|f32|f64; THREADS the
//       launch's thread cap (rows per step = THREADS / (D / VEC)); PER_ROW 0|1 (none's coef)
#include <cuda_runtime.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#define ML_CUDA_HOST_EMU 1
#define ML_SM80 1
#define __launch_bounds__(...)

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
uint3 gridDim;

namespace emu {
std::barrier<>* block_bar = nullptr;
std::barrier<>* warp_bar[8] = {};
uint32_t xch[8][32];
uint32_t mma_a[8][32][4];
uint32_t mma_b[8][32][2];
inline int warp() { return static_cast<int>(threadIdx.x) >> 5; }
inline int lane() { return static_cast<int>(threadIdx.x) & 31; }
inline void warp_sync() { warp_bar[warp()]->arrive_and_wait(); }
}  // namespace emu

inline void __syncthreads() { emu::block_bar->arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned, T v, int off) {
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  const int w = emu::warp(), l = emu::lane();
  std::memcpy(&emu::xch[w][l], &v, 4);
  emu::warp_sync();
  T r;
  std::memcpy(&r, &emu::xch[w][l ^ off], 4);
  emu::warp_sync();
  return r;
}

namespace manual_layers {
namespace cuda_logreg {

alignas(16) unsigned char smem_raw[232448];  // the kernel's extern __shared__ buffer

inline void cp_async16(void* smem, const void* gmem, int src_bytes) {
  if (src_bytes == 16) {
    std::memcpy(smem, gmem, 16);
  } else {
    std::memset(smem, 0, 16);
  }
}
inline void cp_async_commit() {}
inline void cp_async_wait(int) {}

template <typename scalar_t>
uint16_t to_bits(float v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return c10::BFloat16(v).x;
  } else {
    return c10::Half(v).x;
  }
}
template <typename scalar_t>
float from_bits(uint16_t v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return static_cast<float>(c10::BFloat16(v, c10::BFloat16::from_bits()));
  } else {
    return static_cast<float>(c10::Half(v, c10::Half::from_bits()));
  }
}

// cvt.rna.tf32.f32: keep the top 19 bits, rounding to nearest with ties away from zero.
inline uint32_t tf32_round(float v) {
  uint32_t b;
  std::memcpy(&b, &v, 4);
  return (b + 0x1000u) & 0xffffe000u;
}
inline float f32_of(uint32_t b) {
  float v;
  std::memcpy(&v, &b, 4);
  return v;
}
inline void tf32_split(float v, uint32_t& hi, uint32_t& lo) {
  hi = tf32_round(v);
  lo = tf32_round(v - f32_of(hi));
}
inline void tf32_split(uint32_t bits, uint32_t& hi, uint32_t& lo) { tf32_split(f32_of(bits), hi, lo); }

// One warp-wide mma: every lane's fragments are exchanged, then each lane computes its four
// elements of D = A B + D (d[r] = D[g + 8 (r / 2)][2t + r % 2]) in double from A(frag, row, k)
// and B(frag, k, n), which read an element out of the warp's exchanged fragments.
template <int K, typename GetA, typename GetB>
void warp_mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], GetA A, GetB B) {
  const int w = emu::warp(), l = emu::lane();
  for (int r = 0; r < 4; ++r) emu::mma_a[w][l][r] = a[r];
  for (int r = 0; r < 2; ++r) emu::mma_b[w][l][r] = b[r];
  emu::warp_sync();
  const int g = l >> 2, t = l & 3;
  for (int r = 0; r < 4; ++r) {
    const int row = g + 8 * (r / 2), col = 2 * t + r % 2;
    double acc = 0;
    for (int k = 0; k < K; ++k)
      acc += static_cast<double>(A(emu::mma_a[w], row, k)) * B(emu::mma_b[w], k, col);
    d[r] += static_cast<float>(acc);
  }
  emu::warp_sync();
}

// m16n8k8 tf32: A[row][k] in lane 4 (row % 8) + k % 4, register (row / 8) + 2 (k / 4);
// B[k][n] in lane 4 n + k % 4, register k / 4; the low 13 bits of an operand are ignored.
inline void mma1688_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  warp_mma<8>(
      d, a, b,
      [](const uint32_t (*fa)[4], int row, int k) {
        return f32_of(fa[4 * (row % 8) + k % 4][row / 8 + 2 * (k / 4)] & 0xffffe000u);
      },
      [](const uint32_t (*fb)[2], int k, int n) {
        return f32_of(fb[4 * n + k % 4][k / 4] & 0xffffe000u);
      });
}

// m16n8k16 16-bit: A[row][k] in lane 4 (row % 8) + (k % 8) / 2, register (row / 8) + 2 (k / 8),
// half k % 2 (the lower k in the low 16 bits); B[k][n] in lane 4 n + (k % 8) / 2, register
// k / 8, half k % 2.
template <typename scalar_t>
void mma16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  auto half = [](uint32_t word, int h) { return static_cast<uint16_t>(word >> (16 * h)); };
  warp_mma<16>(
      d, a, b,
      [&](const uint32_t (*fa)[4], int row, int k) {
        return from_bits<scalar_t>(
            half(fa[4 * (row % 8) + (k % 8) / 2][row / 8 + 2 * (k / 8)], k % 2));
      },
      [&](const uint32_t (*fb)[2], int k, int n) {
        return from_bits<scalar_t>(half(fb[4 * n + (k % 8) / 2][k / 8], k % 2));
      });
}

}  // namespace cuda_logreg
}  // namespace manual_layers

#include "../../csrc/cuda/logreg_ce_tc.cu"
#include "../../csrc/cuda/loss_dx.cu"

// ce_single_pass (logreg_ce_fused.cu) is the CUDA host side; this program runs the kernel itself.
namespace manual_layers {
namespace cuda_logreg {
template <typename scalar_t>
LossOut ce_single_pass(const Prepared&, CeFusedParams<scalar_t, at::opmath_type<scalar_t>>,
                       CeFusedKernel<scalar_t>, size_t, int64_t, int64_t, double, int64_t, bool,
                       bool, bool) {
  std::abort();
}
}  // namespace cuda_logreg
}  // namespace manual_layers

using namespace manual_layers::cuda_logreg;

// Runs fn() as the kernel of a grid of `grid` blocks of kThreads threads, block after block,
// shared memory poisoned (0xff bytes: NaN in 16 and 32 bits) before each block.
template <typename Fn>
void launch(int grid, Fn fn) {
  gridDim = uint3{static_cast<unsigned>(grid), 1, 1};
  for (int b = 0; b < grid; ++b) {
    std::memset(smem_raw, 0xff, sizeof(smem_raw));
    std::barrier<> block_bar(kThreads);
    std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
    for (int k = 0; k < 8; ++k) warp_bars.push_back(std::make_unique<std::barrier<>>(32));
    emu::block_bar = &block_bar;
    for (int k = 0; k < 8; ++k) emu::warp_bar[k] = warp_bars[k].get();
    std::vector<std::thread> threads;
    for (int tid = 0; tid < kThreads; ++tid) {
      threads.emplace_back([&, tid] {
        threadIdx = uint3{static_cast<unsigned>(tid), 0, 0};
        blockIdx = uint3{static_cast<unsigned>(b), 0, 0};
        fn();
      });
    }
    for (auto& th : threads) th.join();
  }
}

// max |a - e| / max |e|, infinite when a holds a non-finite value (an unwritten output).
double rel_err(const std::vector<double>& a, const std::vector<double>& e) {
  double num = 0, den = 0;
  for (size_t k = 0; k < a.size(); ++k) {
    if (!std::isfinite(a[k])) return static_cast<double>(INFINITY);
    num = std::max(num, std::abs(a[k] - e[k]));
    den = std::max(den, std::abs(e[k]));
  }
  return num / std::max(den, 1e-30);
}

template <typename scalar_t>
const char* dtype_name() {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) return "bf16";
  if constexpr (std::is_same_v<scalar_t, c10::Half>) return "f16";
  if constexpr (std::is_same_v<scalar_t, float>) return "f32";
  return "f64";
}

template <typename scalar_t>
int run_ce_tc(int64_t N, int D, int C, int grid, int stages, const std::string& opts) {
  std::mt19937 gen(N * 131 + D * 7 + C);
  std::normal_distribution<float> nd;
  std::uniform_real_distribution<float> ud(0.1f, 2.0f);
  const bool big = opts.find('W') != std::string::npos;  // weights up to 3e4 (fp16 scaling)
  const bool weights = big || opts.find('w') != std::string::npos;
  const bool smooth = opts.find('s') != std::string::npos;
  const bool ignore = opts.find('i') != std::string::npos;
  std::vector<scalar_t> x(N * D), w(static_cast<size_t>(C) * D);
  for (auto& v : x) v = scalar_t(nd(gen));
  for (auto& v : w) v = scalar_t(nd(gen) / std::sqrt(static_cast<float>(D)));
  std::vector<float> bias(C), cw(C, 1.f);
  for (auto& v : bias) v = nd(gen);
  if (weights) for (auto& v : cw) v = big ? ud(gen) * 1.5e4f : ud(gen);
  std::vector<int64_t> target(N);
  const int64_t ignore_index = -100;
  for (int64_t i = 0; i < N; ++i) target[i] = static_cast<int64_t>(gen() % C);
  if (ignore) for (int64_t i = 1; i < N; i += 7) target[i] = ignore_index;
  const float eps = smooth ? 0.15f : 0.f;

  // float64 reference from the same input values: loss, residual r, sum_i r x_i, sum_i r.
  double den = 0, loss_ref = 0;
  std::vector<double> r_ref(N * C, 0.0), gw_ref(static_cast<size_t>(C) * D, 0.0), gb_ref(C, 0.0);
  double wsum = 0;
  for (int c = 0; c < C; ++c) wsum += cw[c];
  for (int64_t i = 0; i < N; ++i) {
    if (target[i] == ignore_index) continue;
    const int y = static_cast<int>(target[i]);
    den += cw[y];
    std::vector<double> z(C);
    double m = -INFINITY;
    for (int c = 0; c < C; ++c) {
      double s = bias[c];
      for (int d = 0; d < D; ++d)
        s += static_cast<double>(static_cast<float>(x[i * D + d])) * static_cast<float>(w[c * D + d]);
      z[c] = s;
      m = std::max(m, s);
    }
    double se = 0;
    for (int c = 0; c < C; ++c) se += std::exp(z[c] - m);
    const double lse = m + std::log(se);
    double sm = 0;
    for (int c = 0; c < C; ++c) sm += cw[c] * (lse - z[c]);
    loss_ref += (1 - eps) * cw[y] * (lse - z[y]) + eps / C * sm;
    const double a = (1 - eps) * cw[y] + eps / C * wsum;
    for (int c = 0; c < C; ++c) {
      double v = a * std::exp(z[c] - lse) - (c == y ? (1 - eps) * cw[y] : 0.0) - eps / C * cw[c];
      r_ref[i * C + c] = v;
      gb_ref[c] += v;
      for (int d = 0; d < D; ++d) gw_ref[c * D + d] += v * static_cast<float>(x[i * D + d]);
    }
  }

  // The kernel's inputs and outputs, outputs poisoned with NaN (an unwritten element fails).
  const float nan = std::nanf("");
  const float den_f = static_cast<float>(den);
  std::vector<float> res(N * C, nan), ws_gw(static_cast<size_t>(grid) * C * D, nan),
      ws_gb(static_cast<size_t>(grid) * C, nan), ws_loss(grid, nan);
  CeFusedParams<scalar_t, float> p{};
  p.x = x.data();
  p.wx = w.data();
  p.bias = bias.data();
  p.target = target.data();
  p.cw = weights ? cw.data() : nullptr;
  p.den = &den_f;
  p.res = res.data();
  p.ws_gw = ws_gw.data();
  p.ws_gb = ws_gb.data();
  p.ws_loss = ws_loss.data();
  p.N = N;
  p.ignore_index = ignore_index;
  p.D = D;
  p.C = C;
  p.eps = eps;
  p.stages = stages;
  int cp = 0, nt = 0;
  ce_tc_tiles(C, D, &cp, &nt);
  const size_t smem = ce_tc_smem<scalar_t>(cp, D, stages);
  if (smem > sizeof(smem_raw)) {
    std::printf("shared memory %zu > %zu\n", smem, sizeof(smem_raw));
    return 1;
  }
  auto kernel = ce_tc_kernel_for<scalar_t>(cp, nt);
  launch(grid, [&] { kernel(p); });

  // finalize_kernel's sums (block order), then the relative errors.
  double loss = 0;
  std::vector<double> gw(static_cast<size_t>(C) * D, 0.0), gb(C, 0.0), rr(N * C);
  for (int b = 0; b < grid; ++b) {
    loss += ws_loss[b];
    for (int k = 0; k < C * D; ++k) gw[k] += ws_gw[static_cast<size_t>(b) * C * D + k];
    for (int c = 0; c < C; ++c) gb[c] += ws_gb[static_cast<size_t>(b) * C + c];
  }
  std::vector<double> rr_ref(N * C);
  for (int64_t k = 0; k < N * C; ++k) {
    rr[k] = res[k];
    rr_ref[k] = r_ref[k] / den;
  }
  const double e_loss = rel_err({loss}, {loss_ref});
  const double e_gw = rel_err(gw, gw_ref), e_gb = rel_err(gb, gb_ref), e_res = rel_err(rr, rr_ref);
  // 16-bit: fp32 logits of exact products, r split in two 16-bit parts; fp32: 3xTF32 products
  const double tol = std::is_same_v<scalar_t, float> ? 2e-5 : 2e-4;
  const bool ok = e_loss < tol && e_gw < tol && e_gb < tol && e_res < tol;
  std::printf("ce_tc %s N=%lld D=%d C=%d grid=%d stages=%d opts=%s cp=%d nt=%d: loss %.2e "
              "gw %.2e gb %.2e res %.2e -> %s\n",
              dtype_name<scalar_t>(), static_cast<long long>(N), D, C, grid, stages, opts.c_str(), cp, nt, e_loss, e_gw,
              e_gb, e_res, ok ? "OK" : "FAIL");
  return ok ? 0 : 1;
}

// dX = coef * (residual W) against float64, residual in acc_t, coef one element or per row.
template <typename scalar_t>
int run_loss_dx(int64_t N, int D, int C, int64_t threads, bool per_row) {
  using acc_t = at::opmath_type<scalar_t>;
  using namespace manual_layers::cuda_dx;
  constexpr int VEC = dx_vec<scalar_t>();
  std::mt19937 gen(N * 17 + D + C);
  std::normal_distribution<float> nd;
  std::vector<acc_t> res(N * C), coef(per_row ? N : 1);
  std::vector<scalar_t> w(static_cast<size_t>(C) * D);
  for (auto& v : res) v = nd(gen);
  for (auto& v : coef) v = nd(gen);
  for (auto& v : w) v = scalar_t(nd(gen));
  std::vector<scalar_t> out(N * D, scalar_t(std::nanf("")));
  const int64_t nvec = D / VEC;
  const int64_t rows_per_step = std::max<int64_t>(1, std::min<int64_t>(N, threads / nvec));
  const int grid = static_cast<int>(ceil_div(rows_per_step * nvec, kThreads));
  launch(grid, [&] {
    loss_dx_kernel<scalar_t, VEC>(res.data(), coef.data(), per_row, w.data(), out.data(), N, C,
                                  D, rows_per_step);
  });
  std::vector<double> got(N * D), want(N * D);
  for (int64_t i = 0; i < N; ++i)
    for (int d = 0; d < D; ++d) {
      double v = 0;
      for (int c = 0; c < C; ++c) v += static_cast<double>(res[i * C + c]) * static_cast<double>(w[c * D + d]);
      want[i * D + d] = v * coef[per_row ? i : 0];
      got[i * D + d] = static_cast<double>(out[i * D + d]);
    }
  const double err = rel_err(got, want);
  const double tol = sizeof(scalar_t) == 2 ? 1e-2 : (sizeof(scalar_t) == 4 ? 1e-5 : 1e-12);
  std::printf("loss_dx %s N=%lld D=%d C=%d threads=%lld per_row=%d: %.2e -> %s\n",
              dtype_name<scalar_t>(), static_cast<long long>(N), D, C,
              static_cast<long long>(threads), per_row ? 1 : 0, err, err < tol ? "OK" : "FAIL");
  return err < tol ? 0 : 1;
}

int main(int argc, char** argv) {
  const std::string what = argc > 1 ? argv[1] : "";
  if (what == "ce_tc" && argc == 9) {
    const std::string dt = argv[2];
    const int64_t N = std::atoll(argv[3]);
    const int D = std::atoi(argv[4]), C = std::atoi(argv[5]), grid = std::atoi(argv[6]),
              stages = std::atoi(argv[7]);
    const std::string opts = argv[8];
    if (dt == "bf16") return run_ce_tc<c10::BFloat16>(N, D, C, grid, stages, opts);
    if (dt == "f32") return run_ce_tc<float>(N, D, C, grid, stages, opts);
    return run_ce_tc<c10::Half>(N, D, C, grid, stages, opts);
  }
  if (what == "loss_dx" && argc == 8) {
    const std::string dt = argv[2];
    const int64_t N = std::atoll(argv[3]);
    const int D = std::atoi(argv[4]), C = std::atoi(argv[5]);
    const int64_t threads = std::atoll(argv[6]);
    const bool per_row = std::atoi(argv[7]) != 0;
    if (dt == "bf16") return run_loss_dx<c10::BFloat16>(N, D, C, threads, per_row);
    if (dt == "f16") return run_loss_dx<c10::Half>(N, D, C, threads, per_row);
    if (dt == "f32") return run_loss_dx<float>(N, D, C, threads, per_row);
    return run_loss_dx<double>(N, D, C, threads, per_row);
  }
  std::fprintf(stderr,
               "usage: %s ce_tc bf16|f16|f32 N D C GRID STAGES OPTS\n"
               "       %s loss_dx bf16|f16|f32|f64 N D C THREADS PER_ROW\n",
               argv[0], argv[0]);
  return 2;
}
