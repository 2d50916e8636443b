// Host-side check of the sm_90 CUTLASS kernels' arguments (csrc/cuda/experimental/linear_sm90.cuh),
// which no GPU has run yet and the host emulation cannot run (TMA, wgmma): the strides that
// gemm_args, run and run_dgrad give CUTLASS describe the tensors the ops hold, element (i, j) of
// each operand at the offset the op's row-major layout puts it; CUTLASS's own can_implement accepts
// the shapes the ops send and rejects those they must not. No kernel is instantiated (only host
// functions), so this compiles in seconds and needs no GPU. Run by
// tests/test_linear_sm90.py::test_cutlass_argument_layouts.
#include "../../csrc/cuda/experimental/linear_sm90.cuh"

#include <cstdint>
#include <cstdio>

using namespace manual_layers::sm90::detail;
using T = cutlass::bfloat16_t;

static int failures = 0;
#define EXPECT(cond)                                                    \
  do {                                                                  \
    if (!(cond)) {                                                      \
      std::printf("FAIL line %d: %s\n", __LINE__, #cond);               \
      ++failures;                                                       \
    }                                                                   \
  } while (0)

// Offset of element (i, j) (batch 0) under a CUTLASS stride (i stride, j stride, batch).
template <class Stride>
int64_t offset(const Stride& s, int64_t i, int64_t j) {
  return i * static_cast<int64_t>(cute::get<0>(s)) + j * static_cast<int64_t>(cute::get<1>(s));
}

template <class Gemm>
bool implementable(const typename Gemm::Arguments& a) {
  return Gemm::can_implement(a) == cutlass::Status::kSuccess;
}

// 16-byte aligned fake addresses: can_implement looks at shapes and strides, never at memory.
static void* fake(int k) { return reinterpret_cast<void*>(static_cast<uintptr_t>(k) << 20); }

template <template <class> class Fn, bool kAux>
void forward(int rows, int features, int in_features, bool expect_ok) {
  using Gemm = typename FwdGemm<T, Fn, kAux>::Gemm;
  auto a = gemm_args<Gemm, T>(fake(1), fake(2), fake(3), rows, features, in_features, 0, 132);
  // x (rows, in) row-major: A(m, k) at m * in + k; w (features, in): B(n, k) at n * in + k;
  // out (rows, features): D(m, n) at m * features + n.
  EXPECT(offset(a.mainloop.dA, 5, 3) == 5 * in_features + 3);
  EXPECT(offset(a.mainloop.dB, 7, 2) == 7 * in_features + 2);
  EXPECT(offset(a.epilogue.dD, 4, 6) == 4 * features + 6);
  auto& ep = a.epilogue.thread;
  ep.bias_ptr = static_cast<const T*>(fake(4));
  if constexpr (kAux) {
    ep.aux_ptr = static_cast<T*>(fake(5));
    ep.dAux = cutlass::make_cute_packed_stride(decltype(ep.dAux){},
                                               cute::make_shape(rows, features, 1));
    EXPECT(offset(ep.dAux, 4, 6) == 4 * features + 6);  // pre: the layout of out
  }
  EXPECT(implementable<Gemm>(a) == expect_ok);
}

template <template <class> class DFn>
void dgrad(int rows, int hidden, int out, bool expect_ok) {
  using Gemm = typename DgradGemm<T, DFn>::Gemm;
  // M = hidden, N = rows, K = out.
  auto a = gemm_args<Gemm, T>(fake(1), fake(2), fake(3), hidden, rows, out, 0, 132);
  // A(h, o) = w2[o][h], w2 (out, hidden) row-major: at o * hidden + h.
  EXPECT(offset(a.mainloop.dA, 5, 3) == 3 * hidden + 5);
  // B(n, o) = g[n][o], g (rows, out) row-major: at n * out + o.
  EXPECT(offset(a.mainloop.dB, 7, 2) == 7 * out + 2);
  // D(h, n) = G[n][h], G (rows, hidden) row-major: at n * hidden + h.
  EXPECT(offset(a.epilogue.dD, 6, 4) == 4 * hidden + 6);
  auto& ep = a.epilogue.thread;
  ep.aux_ptr = static_cast<const T*>(fake(4));
  ep.dAux = cutlass::make_cute_packed_stride(decltype(ep.dAux){},
                                             cute::make_shape(hidden, rows, 1));
  EXPECT(offset(ep.dAux, 6, 4) == 4 * hidden + 6);  // saved (rows, hidden): the layout of G
  ep.dbias_ptr = static_cast<T*>(fake(5));
  // The bias gradient is indexed by h (the reduction runs over n): stride 1 along M.
  EXPECT(static_cast<int64_t>(cute::get<0>(ep.dDbias)) == 1);
  EXPECT(implementable<Gemm>(a) == expect_ok);
}

int main() {
  // Shapes the ops send (multiples of 8 where TMA needs them), partial tiles, one row.
  forward<GeluErf, true>(37, 264, 24, true);
  forward<Silu, false>(1, 8, 8, true);
  forward<GeluErf, false>(4099, 1024, 512, true);
  forward<Silu, true>(16384, 4096, 1024, true);
  dgrad<DGeluErf>(37, 264, 16, true);
  dgrad<DRelu>(1, 8, 8, true);
  dgrad<DSilu>(8192, 4096, 1024, true);
  dgrad<DGeluTanh>(2053, 520, 72, true);
  // Row strides that are not whole 16-byte vectors: CUTLASS must refuse (the ops check first).
  forward<GeluErf, true>(37, 264, 20, false);
  dgrad<DGeluErf>(37, 260, 16, false);
  std::printf(failures ? "FAILED\n" : "OK\n");
  return failures ? 1 : 0;
}
