// Device code of the tensor-core cross entropy (path 1c): ce_tc_kernel, its constants and PTX
// helpers (the tile layout: ce_tc_layout.cuh). ce_tc.cu describes the kernel and holds its host
// side; ce_tc_cluster.cu the sm_90a cluster instances; tests/cuda_emu/kernels_emu.cpp runs this
// code on the CPU.
//
// fp16: the residual is scaled by an exact power of two, 2^-k >= 1 / (2 max_c w_c), before the
// split (|r| <= 2 max_c w_c, so fp16 cannot overflow) and the partial dW is scaled back.
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "ce_tc_layout.cuh"
#include "common.cuh"
// The PTX wrappers (cp.async, mma.sync) and 16-bit conversions: csrc/cuda/common/mma_sm80.cuh, or
// under ML_CUDA_HOST_EMU the host emulation of tests/cuda_emu/kernels_emu.cpp, which compiles this
// file with g++ and runs the kernel's threads on the CPU (tests/cuda_emu/test_cuda_emu.py).
#ifndef ML_CUDA_HOST_EMU
#include "../common/cluster_sm90.cuh"
#include "../common/mma_sm80.cuh"
#endif

namespace manual_layers {
namespace cuda_logreg {

__device__ __forceinline__ uint32_t lds32(const uint16_t* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}
__device__ __forceinline__ uint32_t pack2(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}
// 3xTF32 (fp32 x): d += a_lo b_hi + a_hi b_lo + a_hi b_hi, the small terms first; a_lo b_lo
// (~2^-22 relative) is dropped.
__device__ __forceinline__ void mma3_tf32(float (&d)[4], const uint32_t (&ah)[4],
                                          const uint32_t (&al)[4], const uint32_t (&bh)[2],
                                          const uint32_t (&bl)[2]) {
  mma1688_tf32(d, al, bh);
  mma1688_tf32(d, ah, bl);
  mma1688_tf32(d, ah, bh);
}

// The kernel (ce_tc.cu describes it).
template <typename scalar_t, int CP, int NT, bool kCl>
__global__ void __launch_bounds__(kThreads, 1)
    ce_tc_kernel(const CeFusedParams<scalar_t, float> p) {
#if ML_SM80
#if !ML_SM90A
  if constexpr (kCl) __trap();  // ce_tc_config chooses the cluster instances on sm_90a only
#endif
  constexpr bool kF32 = std::is_same_v<scalar_t, float>;  // 3xTF32 m16n8k8 instead of m16n8k16
  using elem_t = std::conditional_t<kF32, uint32_t, uint16_t>;  // raw bits in shared memory
  constexpr int EV = 16 / static_cast<int>(sizeof(scalar_t));   // elements per 16-byte copy
  constexpr int NC = CP / 8;   // class n-tiles of the logits = classes per lane in the row phase
  constexpr int MT = CP / 16;  // class m-tiles of dW
  constexpr int ZS = CP + 4;   // sZ row stride (floats)
  // 16-bit x: the residual for dW in two 16-bit parts (hi, lo), or in one (hi) for the cluster
  // instances, which are bound by their mma (ce_tc_cluster.cu). Estimated, not measured: at
  // CP = 16 / 32 the lo part's mma hide under the read of X; whether they do at CP = 64 is for
  // a profile to say.
  constexpr bool kSplitR = !kCl;
  ML_DYNAMIC_SMEM(smem_raw);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int C = p.C;
  const int D = p.D;
  const int DP = (D + 15) / 16 * 16;  // k extent of the logits (X and W are zero past D)
  const int DSP = static_cast<int>(tc_row_stride(D, sizeof(scalar_t)));
  const int NTT = DP / 8;             // column tiles of dW
  const int S = p.stages;
  const int64_t N = p.N;
  // The unit of work is a block, or a cluster of K blocks (kCl) in which block `rank` owns the
  // classes c_base .. c_base + Cq - 1 of every row (CP each, the last one the rest).
  int rank = 0, K = 1;
  int64_t unit = blockIdx.x, units = gridDim.x;
  if constexpr (kCl) {
    rank = cluster_rank();
    K = cluster_size();
    unit = blockIdx.x / K;  // 1-D clusters of a 1-D grid: blocks unit K .. unit K + K - 1
    units = gridDim.x / K;
  }
  const int c_base = rank * CP;
  const int Cq = std::min(CP, C - c_base);

  elem_t* sW = reinterpret_cast<elem_t*>(smem_raw);
  elem_t* sX = sW + CP * DSP;
  float* sZ = reinterpret_cast<float*>(sX + S * kTcRows * DSP);
  unsigned char* sR = reinterpret_cast<unsigned char*>(sZ + kTcSplits * kTcRows * ZS);
  uint16_t* sRh = reinterpret_cast<uint16_t*>(sR);  // 16-bit x: residual hi / lo parts
  uint16_t* sRl = sRh + CP * kTcResStride;
  float* sRf = reinterpret_cast<float*>(sR);         // fp32 x: the residual
  float* sB = reinterpret_cast<float*>(sR + CP * kTcResStride * 4);
  float* sCW = sB + CP;
  float4* sStat = reinterpret_cast<float4*>(sCW + CP);  // kCl: [2][kTcRows] row statistics
  // [kMaxCluster] class-weight sums, then [kMaxCluster] largest |weights|, one per cluster block
  float* sWk = reinterpret_cast<float*>(sStat + 2 * kTcRows);
  uint64_t* sBar = reinterpret_cast<uint64_t*>(sWk + 2 * kMaxCluster);  // kCl: [stages] mbarriers

  // Stage W (zero past C and D), zero the pad columns of every X tile (cp.async writes only
  // columns < D, so they stay zero), bias and class weights.
  const elem_t* wbits = reinterpret_cast<const elem_t*>(p.wx);
  for (int k = tid; k < CP * DSP; k += kThreads) {
    const int c = k / DSP;
    const int d = k - c * DSP;
    sW[k] = (c < Cq && d < D) ? wbits[static_cast<int64_t>(c_base + c) * D + d] : elem_t(0);
  }
  const int pad = DSP - D;  // columns D .. DSP of every row of every X tile
  for (int k = tid; k < S * kTcRows * pad; k += kThreads) {
    const int r = k / pad;
    sX[r * DSP + D + (k - r * pad)] = 0;
  }
  if (tid < CP) {
    sB[tid] = (p.bias != nullptr && tid < Cq) ? p.bias[c_base + tid] : 0.f;
    sCW[tid] = tid < Cq ? (p.cw != nullptr ? p.cw[c_base + tid] : 1.f) : 0.f;
  }
  // The class weights' sum (in class order) and largest magnitude over the classes of each
  // block of the cluster (one block: all C).
  if (tid < K) {
    float v = 0.f, vmax = 0.f;
    const int c_end = std::min(C, (tid + 1) * CP);
    for (int c = tid * CP; c < c_end; ++c) {
      const float w = p.cw != nullptr ? p.cw[c] : 1.f;
      v += w;
      vmax = fmaxf(vmax, fabsf(w));
    }
    sWk[tid] = v;
    sWk[kMaxCluster + tid] = vmax;
  }
  if constexpr (kCl) {
    if (tid < S) mbarrier_init(sBar + tid, 1);  // one arrival (expect_tx) + the bytes
    fence_mbarrier_init();
    cluster_sync();  // every block's barriers set up before any copy signals them
  } else {
    __syncthreads();
  }

  const float den = p.den != nullptr ? p.den[0] : 1.f;
  const float eps = p.eps;
  const float eps_c = eps / static_cast<float>(C);
  const bool smooth = eps != 0.f;
  float wsum = 0.f, wmax = 0.f;  // the same fixed order in every thread (and block)
  for (int k = 0; k < K; ++k) {
    wsum += sWk[k];
    wmax = fmaxf(wmax, sWk[kMaxCluster + k]);
  }
  // fp16: an exact power of two that keeps |r| * rscale <= 1 (|r| <= 2 wmax); bf16 has fp32's
  // exponent range.
  float rscale = 1.f;
  if constexpr (std::is_same_v<scalar_t, at::Half>) {
    int e = 0;
    frexpf(fmaxf(2.f * wmax, 1.f), &e);  // 2 wmax < 2^e
    rscale = ldexpf(1.f, -e);
  }

  // Tiles of this block (or cluster): unit + k units, k < my_tiles.
  const int64_t ntiles = (N + kTcRows - 1) / kTcRows;
  const int64_t my_tiles = unit < ntiles ? (ntiles - 1 - unit) / units + 1 : 0;
  const int chunks = D / EV;  // 16-byte chunks per row
  auto load_tile = [&](int64_t k, int stage) {
    const int64_t row0 = (unit + k * units) * kTcRows;
    elem_t* dst = sX + stage * kTcRows * DSP;
    if constexpr (kCl) {
      // Block `rank` copies the rows rank, rank + K, ... of the tile into every block of the
      // cluster, one bulk copy per row; each block's barrier of this stage expects the whole
      // tile. Rows past N copy row N - 1 again (their residual is 0: they add nothing).
      const uint32_t row_bytes = static_cast<uint32_t>(D) * sizeof(elem_t);
      if (tid == 0) mbarrier_arrive_expect_tx(sBar + stage, kTcRows * row_bytes);
      if (tid < kTcRows && tid % K == rank) {
        const int64_t row = std::min<int64_t>(row0 + tid, N - 1);
        bulk_load_multicast(dst + tid * DSP, p.x + row * static_cast<int64_t>(D), row_bytes,
                            sBar + stage, static_cast<uint16_t>((1u << K) - 1));
      }
    } else {
      for (int e = tid; e < kTcRows * chunks; e += kThreads) {
        const int r = e / chunks;
        const int q = e - r * chunks;
        const int64_t row = row0 + r;
        const bool valid = row < N;
        const scalar_t* src = p.x + (valid ? row : 0) * static_cast<int64_t>(D) + q * EV;
        cp_async16(dst + r * DSP + q * EV, src, valid ? 16 : 0);
      }
    }
  };

  float acc[MT][NT][4];  // dW partials: classes mt * 16 + {g, g + 8}, columns of tile jn
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int jn = 0; jn < NT; ++jn)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][jn][e] = 0.f;
  float gb_part[NC];  // grad_b partials of classes j + 8 k for this thread's row slot
#pragma unroll
  for (int k = 0; k < NC; ++k) gb_part[k] = 0.f;
  float loss_acc = 0.f;
  const bool need_w = p.ws_gw != nullptr;

  // Prologue: the first stages - 1 tiles in flight. One commit group per tile slot, empty
  // when there is no tile, so that cp_async_wait(S - 1) below always means "tile it landed".
  // (kCl: the stages' mbarriers count the copies instead.)
  for (int s = 0; s < S - 1; ++s) {
    if (s < my_tiles) load_tile(s, s);
    if constexpr (!kCl) cp_async_commit();
  }
  // my_tiles depends on blockIdx only: every thread runs the same iterations.
  for (int64_t it = 0; it < my_tiles; ++it) {
    if constexpr (kCl) {
      // Tile it's bytes all in (the stage's (it / S)-th phase); the next load is issued after
      // the cluster barrier of the row phase, when every block is done with its stage.
      mbarrier_wait(sBar + it % S, static_cast<uint32_t>((it / S) & 1));
    } else {
      if (it + S - 1 < my_tiles) load_tile(it + S - 1, static_cast<int>((it + S - 1) % S));
      cp_async_commit();
      cp_async_wait(S - 1);
      __syncthreads();  // every thread's copies of tile it are visible
    }
    const elem_t* xs = sX + static_cast<int>(it % S) * kTcRows * DSP;
    const int64_t row0 = (unit + it * units) * kTcRows;

    // Z: partial logits of m-tile w % 2 over k-steps w / 2, w / 2 + 4, ...
    {
      const int mt = warp % kTcMTiles;
      const int split = warp / kTcMTiles;
      float z[NC][4];
#pragma unroll
      for (int nc = 0; nc < NC; ++nc)
#pragma unroll
        for (int e = 0; e < 4; ++e) z[nc][e] = 0.f;
      if constexpr (kF32) {  // k-steps of 8; every product as 3 tf32 products
        const elem_t* xa = xs + (mt * 16 + g) * DSP + t;
        const elem_t* wb = sW + g * DSP + t;
        for (int k0 = split * 8; k0 < DP; k0 += kTcSplits * 8) {
          uint32_t ah[4], al[4];
          tf32_split(xa[k0], ah[0], al[0]);
          tf32_split(xa[8 * DSP + k0], ah[1], al[1]);
          tf32_split(xa[k0 + 4], ah[2], al[2]);
          tf32_split(xa[8 * DSP + k0 + 4], ah[3], al[3]);
#pragma unroll
          for (int nc = 0; nc < NC; ++nc) {
            uint32_t bh[2], bl[2];
            tf32_split(wb[nc * 8 * DSP + k0], bh[0], bl[0]);
            tf32_split(wb[nc * 8 * DSP + k0 + 4], bh[1], bl[1]);
            mma3_tf32(z[nc], ah, al, bh, bl);
          }
        }
      } else {  // k-steps of 16
        const elem_t* xa = xs + (mt * 16 + g) * DSP + 2 * t;
        const elem_t* wb = sW + g * DSP + 2 * t;
        for (int k0 = split * 16; k0 < DP; k0 += kTcSplits * 16) {
          uint32_t a[4];
          a[0] = lds32(xa + k0);
          a[1] = lds32(xa + 8 * DSP + k0);
          a[2] = lds32(xa + k0 + 8);
          a[3] = lds32(xa + 8 * DSP + k0 + 8);
#pragma unroll
          for (int nc = 0; nc < NC; ++nc) {
            uint32_t b[2];
            b[0] = lds32(wb + nc * 8 * DSP + k0);
            b[1] = lds32(wb + nc * 8 * DSP + k0 + 8);
            mma16816<scalar_t>(z[nc], a, b);
          }
        }
      }
      float* zs = sZ + (split * kTcRows + mt * 16 + g) * ZS + 2 * t;
#pragma unroll
      for (int nc = 0; nc < NC; ++nc) {
        zs[nc * 8] = z[nc][0];
        zs[nc * 8 + 1] = z[nc][1];
        zs[8 * ZS + nc * 8] = z[nc][2];
        zs[8 * ZS + nc * 8 + 1] = z[nc][3];
      }
    }
    __syncthreads();

    // Rows: 8 lanes per row r, lane j holds classes j + 8 k. Every lane runs every shuffle
    // (smooth is uniform over the block); rows past N and ignored rows end with r = 0.
    {
      const int r = tid / kTcLanes;
      const int j = tid % kTcLanes;
      const int64_t i = row0 + r;
      const bool valid = i < N;
      const int64_t y = valid ? p.target[i] : p.ignore_index;
      const bool ignored = y == p.ignore_index;
      const bool in_range = y >= 0 && y < static_cast<int64_t>(C);
      if (!ignored) {
        CUDA_KERNEL_ASSERT(in_range && "linear_ce_fwd: target class index out of range");
      }
      const bool active = !ignored && in_range;  // out of range: only if asserts are off
      const int yi = in_range ? static_cast<int>(y) : 0;
      float zc[NC];
      float m = -std::numeric_limits<float>::infinity();
#pragma unroll
      for (int k = 0; k < NC; ++k) {
        const int c = j + 8 * k;
        float v = 0.f;
#pragma unroll
        for (int s = 0; s < kTcSplits; ++s) v += sZ[(s * kTcRows + r) * ZS + c];
        zc[k] = v + sB[c];
        if (c < Cq) m = fmaxf(m, zc[k]);
      }
      m = group_max<kTcLanes>(m);  // class 0 is on lane 0: finite
      float se = 0.f, zy = 0.f;
#pragma unroll
      for (int k = 0; k < NC; ++k) {
        const int c = j + 8 * k;
        if (c < Cq) se += ml_exp(zc[k] - m);
        if (c_base + c == yi) zy = zc[k];
      }
      se = group_sum<kTcLanes>(se);
      zy = group_sum<kTcLanes>(zy);  // one lane holds z_y (or none: kCl), the others add zeros
      float lse = m + ml_log(se);
      // Label smoothing's sum_c w_c (lse - z_c); kCl: this block's sum_c w_c (m - z_c).
      const float ref = kCl ? m : lse;
      float sm = 0.f;
      if (smooth) {
#pragma unroll
        for (int k = 0; k < NC; ++k) {
          const int c = j + 8 * k;
          if (c < Cq) sm += sCW[c] * (ref - zc[k]);
        }
        sm = group_sum<kTcLanes>(sm);
      }
      if constexpr (kCl) {
        // The row's statistics over all classes from the K blocks' (m_k, se_k, z_y, s_k),
        // lane k reading block k's: lse = M + log(sum_k se_k e^(m_k - M)), M = max_k m_k, and
        // sum_c w_c (lse - z_c) = sum_k (s_k + (lse - m_k) W_k), W_k the block's weight sum.
        // Every block combines the same values in the same order: the same lse everywhere.
        float4* st = sStat + (it & 1) * kTcRows;  // double buffered: one barrier per tile
        if (j == 0) st[r] = make_float4(m, se, zy, sm);
        cluster_sync();
        // Every block is past tile it - 1: its stage, (it + S - 1) % S, can be refilled.
        if (it + S - 1 < my_tiles) load_tile(it + S - 1, static_cast<int>((it + S - 1) % S));
        const float4 q = j < K ? *cluster_map(st + r, j)
                               : make_float4(-std::numeric_limits<float>::infinity(), 0.f, 0.f,
                                             0.f);
        const float M = group_max<kTcLanes>(q.x);
        se = group_sum<kTcLanes>(j < K ? q.y * ml_exp(q.x - M) : 0.f);
        zy = group_sum<kTcLanes>(q.z);
        lse = M + ml_log(se);
        if (smooth) sm = group_sum<kTcLanes>(j < K ? q.w + (lse - q.x) * sWk[j] : 0.f);
      }
      const float wy = p.cw != nullptr && in_range ? p.cw[yi] : 1.f;
      if (active && j == 0 && rank == 0) {
        loss_acc += (1.f - eps) * wy * (lse - zy) + eps_c * sm;
      }
      // r_c = ((1-eps) w_y + (eps/C) sum_k w_k) p_c - (1-eps) w_y [c == y] - (eps/C) w_c
      const float a = (1.f - eps) * wy + eps_c * wsum;
      float* rrow =
          p.res != nullptr && valid ? p.res + i * static_cast<int64_t>(C) + c_base : nullptr;
#pragma unroll
      for (int k = 0; k < NC; ++k) {
        const int c = j + 8 * k;
        float v = 0.f;
        if (active && c < Cq) {
          v = a * ml_exp(zc[k] - lse);
          if (c_base + c == yi) v -= (1.f - eps) * wy;
          if (smooth) v -= eps_c * sCW[c];
        }
        gb_part[k] += v;
        if (rrow != nullptr && c < Cq) rrow[c] = grad_div(v, den);
        if constexpr (kF32) {
          sRf[c * kTcResStrideF + r] = v;
        } else {
          const float vs = v * rscale;
          const uint16_t hi = to_bits<scalar_t>(vs);
          sRh[c * kTcResStride + r] = hi;
          if constexpr (kSplitR) {
            sRl[c * kTcResStride + r] = to_bits<scalar_t>(vs - from_bits<scalar_t>(hi));
          }
        }
      }
    }
    __syncthreads();

    // dW += R^T X_tile: warp w owns column tiles w + 8 jn; k = the tile's rows.
    if (need_w) {
      if constexpr (kF32) {  // k-steps of 8 rows, 3 tf32 products
#pragma unroll
        for (int k0 = 0; k0 < kTcRows; k0 += 8) {
          uint32_t ah[MT][4], al[MT][4];
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            const float* rr = sRf + (mt * 16 + g) * kTcResStrideF + k0 + t;
            tf32_split(rr[0], ah[mt][0], al[mt][0]);
            tf32_split(rr[8 * kTcResStrideF], ah[mt][1], al[mt][1]);
            tf32_split(rr[4], ah[mt][2], al[mt][2]);
            tf32_split(rr[8 * kTcResStrideF + 4], ah[mt][3], al[mt][3]);
          }
          const elem_t* xb = xs + (k0 + t) * DSP + g;
#pragma unroll
          for (int jn = 0; jn < NT; ++jn) {
            const int nt = warp + jn * kWarps;
            if (nt < NTT) {  // warp-uniform
              const elem_t* col = xb + nt * 8;
              uint32_t bh[2], bl[2];
              tf32_split(col[0], bh[0], bl[0]);
              tf32_split(col[4 * DSP], bh[1], bl[1]);
#pragma unroll
              for (int mt = 0; mt < MT; ++mt) mma3_tf32(acc[mt][jn], ah[mt], al[mt], bh, bl);
            }
          }
        }
      } else {  // 16-bit: k-steps of 16 rows, the residual's hi (and lo) parts
#pragma unroll
        for (int k0 = 0; k0 < kTcRows; k0 += 16) {
          uint32_t ah[MT][4], al[MT][4];
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            const int o = (mt * 16 + g) * kTcResStride + k0 + 2 * t;
            ah[mt][0] = lds32(sRh + o);
            ah[mt][1] = lds32(sRh + o + 8 * kTcResStride);
            ah[mt][2] = lds32(sRh + o + 8);
            ah[mt][3] = lds32(sRh + o + 8 * kTcResStride + 8);
            if constexpr (kSplitR) {
              al[mt][0] = lds32(sRl + o);
              al[mt][1] = lds32(sRl + o + 8 * kTcResStride);
              al[mt][2] = lds32(sRl + o + 8);
              al[mt][3] = lds32(sRl + o + 8 * kTcResStride + 8);
            }
          }
          const elem_t* xb = xs + (k0 + 2 * t) * DSP + g;
#pragma unroll
          for (int jn = 0; jn < NT; ++jn) {
            const int nt = warp + jn * kWarps;
            if (nt < NTT) {  // warp-uniform
              const elem_t* col = xb + nt * 8;
              uint32_t b[2];
              b[0] = pack2(col[0], col[DSP]);
              b[1] = pack2(col[8 * DSP], col[9 * DSP]);
#pragma unroll
              for (int mt = 0; mt < MT; ++mt) {
                mma16816<scalar_t>(acc[mt][jn], ah[mt], b);
                if constexpr (kSplitR) mma16816<scalar_t>(acc[mt][jn], al[mt], b);
              }
            }
          }
        }
      }
    }
    __syncthreads();  // the next iteration refills this X stage, sZ and sRh / sRl
  }
  if constexpr (!kCl) cp_async_wait(0);

  // Block partials. dW: each accumulator element is one (class, column) of this block.
  if (need_w) {
    const float unscale = 1.f / rscale;  // exact: a power of two
    float* out = p.ws_gw + (unit * C + c_base) * static_cast<int64_t>(D);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int jn = 0; jn < NT; ++jn) {
        const int d = (warp + jn * kWarps) * 8 + 2 * t;  // d < D implies d + 1 < D (D % 8 == 0)
        const int c0 = mt * 16 + g;
        if (d < D && c0 < Cq) {
          out[static_cast<int64_t>(c0) * D + d] = acc[mt][jn][0] * unscale;
          out[static_cast<int64_t>(c0) * D + d + 1] = acc[mt][jn][1] * unscale;
        }
        if (d < D && c0 + 8 < Cq) {
          out[static_cast<int64_t>(c0 + 8) * D + d] = acc[mt][jn][2] * unscale;
          out[static_cast<int64_t>(c0 + 8) * D + d + 1] = acc[mt][jn][3] * unscale;
        }
      }
  }
  // grad_b: the 32 row slots' partials added in slot order (sZ is free after the loop).
  if (p.ws_gb != nullptr) {
    float* red = sZ;  // [kTcRows][CP]
#pragma unroll
    for (int k = 0; k < NC; ++k) red[(tid / kTcLanes) * CP + tid % kTcLanes + 8 * k] = gb_part[k];
    __syncthreads();
    if (tid < Cq) {
      float v = 0.f;
      for (int r = 0; r < kTcRows; ++r) v += red[r * CP + tid];
      p.ws_gb[unit * C + c_base + tid] = v;
    }
    __syncthreads();  // red is reused by block_sum
  }
  const float block_loss = block_sum(loss_acc, sZ);
  if (tid == 0 && rank == 0) p.ws_loss[unit] = block_loss;  // kCl: rank 0 holds the loss
  if constexpr (kCl) {
    cluster_sync();  // no block leaves while another may still read its row statistics
  }
#else
  __trap();  // ce_tc_config chooses this kernel on sm_80+ only
#endif
}

// The sm_90a cluster instances (ce_tc_cluster.cu; explicitly instantiated there for float,
// at::Half and at::BFloat16).
template <typename scalar_t>
CeFusedKernel<scalar_t> ce_tc_cluster_kernel(int nt);

}  // namespace cuda_logreg
}  // namespace manual_layers
