// Device code of the fused linear layer (linear.cu holds the host side): the elementwise
// activation kernels, the row-wise softmax, the two-stage column sum and the activation gradient
// with the bias gradient's column sums in one pass. tests/cuda_emu/kernels_emu.cpp runs them on
// the CPU.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <utility>

#include "../../common.h"
#include "../common/cuda_common.cuh"

namespace manual_layers {
namespace {

using namespace cuda_common;

// =============================================================================================
// Kernels
// =============================================================================================

// out[i] = act(z[i]) for i < n. z and out are 16-byte aligned (they may be the same buffer:
// every element is read and written by one thread, read first). VEC elements per vector.
template <typename T, Act A, int VEC>
__global__ void act_fwd_kernel(const T* z, T* out, int64_t n) {
  using acc_t = at::opmath_type<T>;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = n / VEC;
  for (int64_t i = tid; i < nvec; i += stride) {
    AlignedVec<T, VEC> v = load_vec<VEC>(z + i * VEC);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      v.val[j] = static_cast<T>(act_forward<A>(static_cast<acc_t>(v.val[j])));
    }
    store_vec<VEC>(out + i * VEC, v);
  }
  for (int64_t i = nvec * VEC + tid; i < n; i += stride) {
    out[i] = static_cast<T>(act_forward<A>(static_cast<acc_t>(z[i])));
  }
}

// G[i] = g[i] * act'(s[i]) for i < n; all three 16-byte aligned, G a separate buffer.
template <typename T, Act A, int VEC>
__global__ void act_bwd_kernel(const T* __restrict__ g, const T* __restrict__ s,
                               T* __restrict__ G, int64_t n) {
  using acc_t = at::opmath_type<T>;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = n / VEC;
  for (int64_t i = tid; i < nvec; i += stride) {
    const AlignedVec<T, VEC> gv = load_vec<VEC>(g + i * VEC);
    const AlignedVec<T, VEC> sv = load_vec<VEC>(s + i * VEC);
    AlignedVec<T, VEC> r;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      r.val[j] = static_cast<T>(
          act_backward<A>(static_cast<acc_t>(gv.val[j]), static_cast<acc_t>(sv.val[j])));
    }
    store_vec<VEC>(G + i * VEC, r);
  }
  for (int64_t i = nvec * VEC + tid; i < n; i += stride) {
    G[i] = static_cast<T>(act_backward<A>(static_cast<acc_t>(g[i]), static_cast<acc_t>(s[i])));
  }
}

constexpr int kWarpsPerBlock = kThreads / 32;

// Row-wise softmax of z (rows x cols), one warp per row (grid-stride over rows), written to
// out (may alias z: each element is read and then written by the same lane).
template <typename T>
__global__ void softmax_fwd_kernel(const T* z, T* out, int64_t rows, int64_t cols) {
  using acc_t = at::opmath_type<T>;
  const int lane = threadIdx.x & 31;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = warp; r < rows; r += warp_stride) {  // uniform within a warp
    const T* zr = z + r * cols;
    T* yr = out + r * cols;
    acc_t mx = -std::numeric_limits<acc_t>::infinity();
    for (int64_t j = lane; j < cols; j += 32) {
      const acc_t v = static_cast<acc_t>(zr[j]);
      mx = v > mx ? v : mx;
    }
    mx = warp_max(mx);
    acc_t sum = acc_t(0);
    for (int64_t j = lane; j < cols; j += 32) sum += ml_exp(static_cast<acc_t>(zr[j]) - mx);
    sum = warp_sum(sum);
    const acc_t inv = acc_t(1) / sum;
    for (int64_t j = lane; j < cols; j += 32) {
      yr[j] = static_cast<T>(ml_exp(static_cast<acc_t>(zr[j]) - mx) * inv);
    }
  }
}

// Softmax backward, row-wise: G = y * (g - sum_j g_j y_j). One warp per row.
template <typename T>
__global__ void softmax_bwd_kernel(const T* __restrict__ g, const T* __restrict__ y,
                                   T* __restrict__ G, int64_t rows, int64_t cols) {
  using acc_t = at::opmath_type<T>;
  const int lane = threadIdx.x & 31;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = warp; r < rows; r += warp_stride) {
    const T* gr = g + r * cols;
    const T* yr = y + r * cols;
    T* Gr = G + r * cols;
    acc_t dot = acc_t(0);
    for (int64_t j = lane; j < cols; j += 32) {
      dot += static_cast<acc_t>(gr[j]) * static_cast<acc_t>(yr[j]);
    }
    dot = warp_sum(dot);
    for (int64_t j = lane; j < cols; j += 32) {
      const acc_t yv = static_cast<acc_t>(yr[j]);
      Gr[j] = static_cast<T>(yv * (static_cast<acc_t>(gr[j]) - dot));
    }
  }
}

// Column sums of G (rows x cols), stage 1: block (32, 8) covers 32 columns and one chunk of
// rows_per_chunk rows (blockIdx.y); each thread sums every 8th row of the chunk for its column,
// then the 8 partial sums are added in a fixed order. partial is (gridDim.y, cols).
constexpr int kColTileX = 32;
constexpr int kColTileY = 8;

template <typename T>
__global__ void colsum_partial_kernel(const T* __restrict__ G, at::opmath_type<T>* __restrict__ partial,
                                      int64_t rows, int64_t cols, int64_t rows_per_chunk) {
  using acc_t = at::opmath_type<T>;
  __shared__ acc_t sh[kColTileY][kColTileX + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColTileX + threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  int64_t r1 = r0 + rows_per_chunk;
  if (r1 > rows) r1 = rows;
  acc_t s = acc_t(0);
  if (col < cols) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kColTileY) s += static_cast<acc_t>(G[r * cols + col]);
  }
  sh[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    acc_t t = acc_t(0);
#pragma unroll
    for (int k = 0; k < kColTileY; ++k) t += sh[k][threadIdx.x];
    partial[static_cast<int64_t>(blockIdx.y) * cols + col] = t;
  }
}

// Stage 2: out[c] = sum over chunks of partial[chunk, c], chunks in increasing order.
template <typename T>
__global__ void colsum_final_kernel(const at::opmath_type<T>* __restrict__ partial,
                                    T* __restrict__ out, int64_t chunks, int64_t cols) {
  using acc_t = at::opmath_type<T>;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < cols; c += stride) {
    acc_t t = acc_t(0);
    for (int64_t k = 0; k < chunks; ++k) t += partial[k * cols + c];
    out[c] = static_cast<T>(t);
  }
}

// G = g * act'(s) and the column sums of G in one pass over the rows (the bias gradient without
// a second read of G). Block (32, kFuseRows): lane x owns the VEC adjacent columns
// [col, col + VEC) of the block's 32 * VEC column tile (blockIdx.x); thread row y takes rows
// r0 + y, r0 + y + kFuseRows, ... of the block's chunk of rows_per_chunk rows (blockIdx.y) and
// sums, in acc_t, the values it stores (rounded to T: the bias gradient is the column sum of the
// very G the weight-gradient GEMM reads, as with cuBLASLt's BGRADB). The kFuseRows sums of a
// column are then added in a fixed order and written to partial (gridDim.y, cols); the chunks
// are summed in order by colsum_final_kernel. Needs cols % VEC == 0 and 16-byte aligned
// g, s, G, so that every vector lies in one row.
constexpr int kFuseRows = 8;

template <typename T, Act A, int VEC>
__global__ void __launch_bounds__(32 * kFuseRows)
    act_bwd_colsum_kernel(const T* __restrict__ g, const T* __restrict__ s, T* __restrict__ G,
                          at::opmath_type<T>* __restrict__ partial, int64_t rows, int64_t cols,
                          int64_t rows_per_chunk) {
  using acc_t = at::opmath_type<T>;
  static_assert(VEC <= kFuseRows, "one thread of the block per column of the tile");
  constexpr int kTile = 32 * VEC;
  __shared__ acc_t sh[kFuseRows][kTile];
  const int64_t tile0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t col = tile0 + static_cast<int64_t>(threadIdx.x) * VEC;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
  acc_t acc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) acc[j] = acc_t(0);
  if (col < cols) {  // cols % VEC == 0: the whole vector is in range
#pragma unroll 2
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kFuseRows) {
      const int64_t off = r * cols + col;
      const AlignedVec<T, VEC> gv = load_vec<VEC>(g + off);
      const AlignedVec<T, VEC> sv = load_vec<VEC>(s + off);
      AlignedVec<T, VEC> out;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        out.val[j] = static_cast<T>(
            act_backward<A>(static_cast<acc_t>(gv.val[j]), static_cast<acc_t>(sv.val[j])));
        acc[j] += static_cast<acc_t>(out.val[j]);
      }
      store_vec<VEC>(G + off, out);
    }
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) sh[threadIdx.y][threadIdx.x * VEC + j] = acc[j];
  __syncthreads();
  const int t = threadIdx.y * 32 + threadIdx.x;
  if (t < kTile && tile0 + t < cols) {
    acc_t sum = acc_t(0);
#pragma unroll
    for (int k = 0; k < kFuseRows; ++k) sum += sh[k][t];
    partial[static_cast<int64_t>(blockIdx.y) * cols + tile0 + t] = sum;
  }
}

// The row chunking of a two-stage column sum over `gx` column tiles: about `target_blocks`
// blocks in all, each chunk at least `min_rows` rows, fewer than 65536 chunks (gridDim.y).
// Returns {chunks, rows_per_chunk}; depends on its arguments only (deterministic sums).
std::pair<int64_t, int64_t> column_chunks(int64_t rows, int64_t gx, int64_t target_blocks,
                                          int64_t min_rows) {
  int64_t chunks = ceil_div(target_blocks, gx);
  chunks = std::min<int64_t>(chunks, std::min<int64_t>(ceil_div(rows, min_rows), 65535));
  chunks = std::max<int64_t>(chunks, 1);
  const int64_t rows_per_chunk = ceil_div(rows, chunks);
  return {ceil_div(rows, rows_per_chunk), rows_per_chunk};
}

}  // namespace
}  // namespace manual_layers
