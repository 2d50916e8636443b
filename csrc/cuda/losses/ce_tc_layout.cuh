// The tile layout of the tensor-core cross entropy (path 1c, ce_tc.cu): its constants, the
// shared-memory layout and size, and the instance a shape takes. Host and device code (the
// host emulation of tests/cuda_emu uses it too).
//
// Shared memory (elements as raw bits; row stride DSP = tc_row_stride(D), so that the fragment
// loads of 8 rows x 4 lanes hit 32 different banks):
//   sW   [CP][DSP]                 weight, zero past C and D
//   sX   [stages][kTcRows][DSP]    X tiles, columns D .. DSP zero
//   sZ   [kTcSplits][kTcRows][ZS]  float partial logits (ZS = CP + 4); reused at the end
//   sRh, sRl [CP][kTcResStride]    16-bit x: residual hi / lo parts, classes x rows
//   sRf  [CP][kTcResStrideF]       fp32 x: the residual, classes x rows (same bytes)
//   sB, sCW [CP]                   float bias (0 without), class weights (1 without, 0 past C)
#pragma once

#include <cstddef>
#include <cstdint>

#include "common.cuh"

namespace manual_layers {
namespace cuda_logreg {

constexpr int kTcRows = 32;                          // rows per tile: 2 m-tiles of 16
constexpr int kTcMTiles = kTcRows / 16;              // m-tiles of the logits product
constexpr int kTcSplits = kWarps / kTcMTiles;        // k-splits of the logits product (4)
constexpr int kTcLanes = kThreads / kTcRows;         // lanes per row in the row phase (8)
constexpr int kTcResStride = kTcRows + 8;            // sRh / sRl row stride (16-bit elements)
constexpr int kTcResStrideF = kTcRows + 4;           // sRf row stride (fp32 x: floats)
constexpr int kMaxCluster = 8;                       // blocks per cluster (portable limit)
constexpr int kClClasses = 32;                       // classes per block of a cluster
static_assert(kTcLanes == 8, "the row phase assumes 8 lanes per row");

// Row stride, in elements, of the X and W tiles in shared memory: with it the fragment loads of
// 8 rows x 4 lanes hit 32 different banks (16-bit: DSP / 2 words = 4 mod 32; fp32: DSP = 4 mod
// 32 words).
__host__ __device__ constexpr int64_t tc_row_stride(int64_t D, int64_t elem_bytes) {
  return elem_bytes == 2 ? (D + 63) / 64 * 64 + 8 : (D + 31) / 32 * 32 + 4;
}

template <typename scalar_t>
size_t ce_tc_smem(int64_t cp, int64_t D, int64_t stages) {
  constexpr int64_t es = sizeof(scalar_t);
  const int64_t dsp = tc_row_stride(D, es);
  const int64_t zs = cp + 4;
  return static_cast<size_t>((cp + stages * kTcRows) * dsp * es +        // sW, sX
                             kTcSplits * kTcRows * zs * 4 +               // sZ
                             cp * kTcResStride * 4 +                      // sRh + sRl or sRf
                             2 * cp * 4 +                                 // sB, sCW
                             2 * kTcRows * 16 + 2 * kMaxCluster * 4 +     // sStat, sWk
                             stages * 8);                                 // sBar
}

// The kernel instance for a shape of ce_tc_shape_ok or ce_tc_cluster_shape_ok: classes per
// block cp (padded to 16, 32 or 64; a cluster's blocks 32 each), nt column tiles of dW per warp
// (the next instance up from ceil(ceil(D / 16) * 2 / 8)), and the blocks per cluster (1: no
// cluster; else ceil(C / 32)).
inline void ce_tc_tiles(int64_t C, int64_t D, bool cluster, int* cp, int* nt, int* blocks) {
  *cp = cluster ? kClClasses : (C <= 16 ? 16 : (C <= 32 ? 32 : 64));
  *blocks = cluster ? static_cast<int>(ceil_div(C, kClClasses)) : 1;
  const int64_t need = ceil_div(ceil_div(D, 16) * 2, kWarps);
  *nt = need <= 4 ? 4 : (need <= 8 ? 8 : 16);
}

}  // namespace cuda_logreg
}  // namespace manual_layers
