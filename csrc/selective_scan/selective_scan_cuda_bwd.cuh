// Backward kernel of the CUDA selective scan (work split: selective_scan_cuda_kernel.h). Included once
// per dtype by selective_scan_bwd_{fp32,bf16,fp16}.cu.
//
// With h_t = a_t h_{t-1} + b_t (a_t = exp(dt_t A), b_t = dt_t u_t B_t), y_t = sum_n C_t h_t and dy_t the
// gradient of the pre-skip output, the gradient of h_t is q_t = dy_t C_t + r_{t+1} with
// r_t = a_t q_t (r at the end of the sequence: dlast_state): a reverse scan of the maps
// r -> a_t r + a_t dy_t C_t. Then dC_t += dy_t h_t, dB_t += q_t dt_t u_t, d(dt_t u_t) += q_t B_t,
// and w_t = q_t a_t h_{t-1} gives ddt_t += w_t A and dA += w_t dt_t.
#pragma once
#include "selective_scan/selective_scan_cuda_common.cuh"

namespace momoe {
namespace scan_cuda {

constexpr float kLn2 = 0.6931471805599453f;

// Where a backward block flushes its dB/dC sums: rows (b, g, n) of the (batch, G, N, L) buffers.
struct BcGrad {
  float* dB;
  float* dC;
  int64_t row0;  // (b * G + g) * N
  int64_t L, t0;
  int len;
};

// Adds `rows` state rows (n_first ...) of the block's dB/dC sums over channels (step t of row r at
// r * kChunk + step_slot<kItems>(t)) to the global buffers, one atomic per (row, step), and clears
// them. Contains block barriers.
template <int kItems, int kThreads>
__device__ __forceinline__ void flush_bc(float* sdB, float* sdC, const BcGrad& g, int n_first, int rows) {
  __syncthreads();
  for (int j = threadIdx.x; j < rows * kChunk; j += kThreads) {
    const int row = j / kChunk, t = j % kChunk;
    const int slot = row * kChunk + step_slot<kItems>(t);
    if (t < g.len) {
      const int64_t at = (g.row0 + n_first + row) * g.L + g.t0 + t;
      atomicAdd(g.dB + at, sdB[slot]);
      atomicAdd(g.dC + at, sdC[slot]);
    }
    sdB[slot] = 0.0f;
    sdC[slot] = 0.0f;
  }
  __syncthreads();
}

// The backward of one chunk for one lane (kItems steps of channel c), over every state row n.
// Accumulates y (the recomputed scan output), ddu (gradient of dt u), ddt (gradient of dt through
// the decays, in units of A * log2(e)); dA goes to the channel's table sdAc, the state gradient at
// the chunk start to sRc (in: at the chunk end). chunk_state: the saved state at the chunk start
// (nullptr for padding channels). Arguments as in fwd_chunk_states.
template <int kThreads, int kItems, bool kMixed>
__device__ __forceinline__ void bwd_chunk_states(float (&y)[kItems], float (&ddu)[kItems], float (&ddt)[kItems],
                                                 const float (&dt)[kItems], const float (&du)[kItems],
                                                 const float (&dy)[kItems], const float* sAc, float* sdAc,
                                                 int a_stride, float* sRc, const LaneIds<kItems>& smod_lane,
                                                 const float* B_lane, const float* C_lane, int64_t Lp, int N,
                                                 const float* chunk_state, float* sdB, float* sdC,
                                                 const BcGrad& bc) {
  constexpr int kLanes = kChunk / kItems;
  const int s = threadIdx.x % kLanes;
  const int m0 = smod_lane[0];
#pragma unroll 1
  for (int n = 0; n < N; ++n) {
    const int row = n % kBwdBcRows;
    float Bv[kItems], Cv[kItems], av[kItems], hv[kItems], A2[kItems];
    load_row_items<kItems>(B_lane + n * Lp, Bv);
    load_row_items<kItems>(C_lane + n * Lp, Cv);
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      A2[i] = sAc[(kMixed ? smod_lane[i] : m0) * a_stride + n];
      av[i] = exp2_approx(dt[i] * A2[i]);
    }
    // Forward recompute from the saved chunk state: hv[i] = the state after step i.
    float P = av[0], Q = du[0] * Bv[0];
#pragma unroll
    for (int i = 1; i < kItems; ++i) {
      Q = av[i] * Q + du[i] * Bv[i];
      P = av[i] * P;
    }
    float h0 = 0.0f;
    if (s == 0) {
      h0 = chunk_state != nullptr ? chunk_state[n] : 0.0f;
      Q = P * h0 + Q;
      P = 0.0f;
    }
    segment_scan<kLanes, false>(P, Q);
    float h = __shfl_up_sync(kFullMask, Q, 1, kLanes);
    if (s == 0) h = h0;
    const float h_start = h;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      h = av[i] * h + du[i] * Bv[i];
      hv[i] = h;
      y[i] += h * Cv[i];
    }
    // Reverse scan: the lane's steps composed as r_start = P r_end + Q, the carry folded into the last lane.
    P = 1.0f;
    Q = 0.0f;
#pragma unroll
    for (int i = kItems - 1; i >= 0; --i) {
      Q = av[i] * (Q + dy[i] * Cv[i]);
      P = av[i] * P;
    }
    float rc = 0.0f;
    if (s == kLanes - 1) {
      rc = sRc[n];
      Q = P * rc + Q;
      P = 0.0f;
    }
    segment_scan<kLanes, true>(P, Q);
    float r = __shfl_down_sync(kFullMask, Q, 1, kLanes);
    if (s == kLanes - 1) r = rc;
    float dA = 0.0f;  // this lane's dA, summed over a run of steps of one modality
#pragma unroll
    for (int i = kItems - 1; i >= 0; --i) {
      const float q = dy[i] * Cv[i] + r;
      const float w = q * av[i] * (i > 0 ? hv[i - 1] : h_start);
      ddt[i] += w * A2[i];
      dA += w * dt[i];
      ddu[i] += q * Bv[i];
      atomicAdd(sdB + row * kChunk + step_slot<kItems>(s, i), q * du[i]);
      atomicAdd(sdC + row * kChunk + step_slot<kItems>(s, i), dy[i] * hv[i]);
      r = av[i] * q;
      if (kMixed && (i == 0 || smod_lane[i - 1] != smod_lane[i])) {
        atomicAdd(sdAc + smod_lane[i] * a_stride + n, dA);
        dA = 0.0f;
      }
    }
    if (s == 0) sRc[n] = r;
    if (!kMixed) {  // one modality: summed over the channel's lanes (one warp segment), added by lane 0
      dA = segment_sum<kLanes>(dA);
      if (s == 0) sdAc[m0 * a_stride + n] += dA;
    }
    if (row == kBwdBcRows - 1 || n == N - 1) flush_bc<kItems, kThreads>(sdB, sdC, bc, n - row, row + 1);
  }
}

template <typename T, int kChannels, int kItems>
__global__ void __launch_bounds__(kChannels * (kChunk / kItems), 3)
    selective_scan_bwd_kernel(const ScanArgs a, const BwdOut o) {
  constexpr int kLanes = kChunk / kItems;
  constexpr int kThreads = kChannels * kLanes;
  using Tl = Tile<kItems>;
  const int N = static_cast<int>(a.N), M = static_cast<int>(a.M);
  const int a_stride = kChannels * N + 1;
  extern __shared__ float4 smem_f4[];
  float* tile0 = reinterpret_cast<float*>(smem_f4);  // delta, then z, then dz
  float* tile1 = tile0 + kChannels * Tl::kRow;       // u, then du
  float* tile2 = tile1 + kChannels * Tl::kRow;       // dout, then ddelta
  float* sA = tile2 + kChannels * Tl::kRow;
  float* sdA = sA + M * a_stride;
  float* sD = sdA + M * a_stride;
  float* sBias = sD + M * kChannels;
  float* sdD = sBias + M * kChannels;
  float* sdBias = sdD + M * kChannels;
  float* sR = sdBias + M * kChannels;
  float* sdB = sR + kChannels * N;
  float* sdC = sdB + kBwdBcRows * kChunk;
  int* smod = reinterpret_cast<int*>(sdC + kBwdBcRows * kChunk);

  const BlockTile bt = block_tile<kChannels>(a);
  const int c = threadIdx.x / kLanes, s = threadIdx.x % kLanes;
  const bool active = c < bt.nc;
  load_tables<kChannels, kThreads>(sA, sD, sBias, a, bt.d0, bt.nc);
  for (int i = threadIdx.x; i < M * a_stride; i += kThreads) sdA[i] = 0.0f;
  for (int i = threadIdx.x; i < M * kChannels; i += kThreads) sdD[i] = sdBias[i] = 0.0f;
  for (int i = threadIdx.x; i < kBwdBcRows * kChunk; i += kThreads) sdB[i] = sdC[i] = 0.0f;
  for (int i = threadIdx.x; i < kChannels * N; i += kThreads) {
    const int cc = i / N;
    sR[i] = (o.dlast_state != nullptr && cc < bt.nc) ? o.dlast_state[(bt.b * a.dim + bt.d0) * N + i] : 0.0f;
  }
  // (the barrier in load_chunk_modality orders the writes above before their first reads)

  const T* u = static_cast<const T*>(a.u);
  const T* delta = static_cast<const T*>(a.delta);
  const T* z = static_cast<const T*>(a.z);
  const T* dout = static_cast<const T*>(o.dout);
  const int64_t n_chunks = num_chunks(a.L);
  const int64_t Lp = n_chunks * kChunk;
  const int64_t bc_row = (bt.b * a.G + bt.g) * N * Lp;
  for (int64_t ci = n_chunks - 1; ci >= 0; --ci) {
    const int64_t t0 = ci * kChunk;
    const int len = static_cast<int>(a.L - t0 < kChunk ? a.L - t0 : kChunk);
    load_tile<T, kChannels, kItems, kThreads>(tile0, delta + bt.b * a.ldelta.b + bt.d0 * a.ldelta.c + t0 * a.ldelta.t,
                                              a.ldelta.c, a.ldelta.t, bt.nc, len);
    load_tile<T, kChannels, kItems, kThreads>(tile1, u + bt.b * a.lu.b + bt.d0 * a.lu.c + t0 * a.lu.t, a.lu.c,
                                              a.lu.t, bt.nc, len);
    load_tile<T, kChannels, kItems, kThreads>(tile2, dout + bt.b * o.ldout.b + bt.d0 * o.ldout.c + t0 * o.ldout.t,
                                              o.ldout.c, o.ldout.t, bt.nc, len);
    const bool uniform = load_chunk_modality<kItems, kThreads>(smod, a, bt.b, t0, len);
    const LaneIds<kItems> smod_lane{smod, s};

    float dt[kItems], du[kItems], dy[kItems], y[kItems], ddu[kItems], ddt[kItems];
    read_items<kItems>(tile0, c, s, dt);
    read_items<kItems>(tile1, c, s, du);  // u for now
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      float x = dt[i] + sBias[smod_lane[i] * kChannels + c];
      if (a.softplus) x = softplus(x);
      dt[i] = s * kItems + i < len ? x : 0.0f;  // steps past the end: the identity map
      du[i] *= dt[i];
      y[i] = ddu[i] = ddt[i] = 0.0f;
    }
    if (z != nullptr) {
      __syncthreads();  // every lane has read delta
      load_tile<T, kChannels, kItems, kThreads>(tile0, z + bt.b * a.lz.b + bt.d0 * a.lz.c + t0 * a.lz.t, a.lz.c,
                                                a.lz.t, bt.nc, len);
      __syncthreads();
    }
    // dy: the gradient of y + D u (before the gate).
    read_items<kItems>(tile2, c, s, dy);
    if (z != nullptr) {
      float zv[kItems];
      read_items<kItems>(tile0, c, s, zv);
#pragma unroll
      for (int i = 0; i < kItems; ++i) dy[i] *= zv[i] * sigmoid(zv[i]);
    }

    const BcGrad bc{o.dB, o.dC, (bt.b * a.G + bt.g) * N, a.L, t0, len};
    const float* B_lane = a.B + bc_row + t0 + s * kItems;
    const float* C_lane = a.C + bc_row + t0 + s * kItems;
    const float* chunk_state = active ? o.chunk_states + ((bt.b * a.dim + bt.d0 + c) * n_chunks + ci) * N : nullptr;
    if (uniform) {
      bwd_chunk_states<kThreads, kItems, false>(y, ddu, ddt, dt, du, dy, sA + c * N, sdA + c * N, a_stride, sR + c * N,
                                                smod_lane, B_lane, C_lane, Lp, N, chunk_state, sdB, sdC, bc);
    } else {
      bwd_chunk_states<kThreads, kItems, true>(y, ddu, ddt, dt, du, dy, sA + c * N, sdA + c * N, a_stride, sR + c * N,
                                               smod_lane, B_lane, C_lane, Lp, N, chunk_state, sdB, sdC, bc);
    }

    // Gate, skip and dt: each lane overwrites its own steps of the tiles with du, ddelta and dz.
    float uv[kItems], gv[kItems], zv[kItems], dD[kItems];
    read_items<kItems>(tile1, c, s, uv);
    read_items<kItems>(tile2, c, s, gv);
    if (z != nullptr) read_items<kItems>(tile0, c, s, zv);
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const float Dm = sD[smod_lane[i] * kChannels + c];
      const bool valid = s * kItems + i < len;
      if (z != nullptr) {  // dz = dout (y + D u) silu'(z)
        const float sz = sigmoid(zv[i]);
        zv[i] = gv[i] * (y[i] + Dm * uv[i]) * sz * (1.0f + zv[i] * (1.0f - sz));
      }
      // d softplus(x) / dx = sigmoid(x) = 1 - exp(-softplus(x))
      const float sg = a.softplus ? -expm1f(-dt[i]) : 1.0f;
      const float ddelta = valid ? (ddt[i] * kLn2 + ddu[i] * uv[i]) * sg : 0.0f;
      dD[i] = valid ? dy[i] * uv[i] : 0.0f;
      gv[i] = ddelta;
      uv[i] = ddu[i] * dt[i] + dy[i] * Dm;  // du
    }
    write_items<kItems>(tile1, c, s, uv);
    write_items<kItems>(tile2, c, s, gv);
    if (z != nullptr) write_items<kItems>(tile0, c, s, zv);
    add_by_modality<kLanes, kItems>(uniform, sdD + c, kChannels, smod_lane, dD);
    add_by_modality<kLanes, kItems>(uniform, sdBias + c, kChannels, smod_lane, gv);
    __syncthreads();
    store_tile<T, kChannels, kItems, kThreads>(
        static_cast<T*>(o.du) + bt.b * o.ldu.b + bt.d0 * o.ldu.c + t0 * o.ldu.t, tile1, o.ldu.c, o.ldu.t, bt.nc, len);
    store_tile<T, kChannels, kItems, kThreads>(
        static_cast<T*>(o.ddelta) + bt.b * o.lddelta.b + bt.d0 * o.lddelta.c + t0 * o.lddelta.t, tile2, o.lddelta.c,
        o.lddelta.t, bt.nc, len);
    if (z != nullptr && o.dz != nullptr) {
      store_tile<T, kChannels, kItems, kThreads>(
          static_cast<T*>(o.dz) + bt.b * o.ldz.b + bt.d0 * o.ldz.c + t0 * o.ldz.t, tile0, o.ldz.c, o.ldz.t, bt.nc,
          len);
    }
    __syncthreads();  // the next chunk overwrites the tiles
  }

  const int64_t row0 = bt.b * a.dim + bt.d0;
  if (o.dinitial_state != nullptr)
    for (int i = threadIdx.x; i < bt.nc * N; i += kThreads) o.dinitial_state[row0 * N + i] = sR[i];
  for (int i = threadIdx.x; i < M * bt.nc * N; i += kThreads) {
    const int m = i / (bt.nc * N), cn = i % (bt.nc * N);
    o.dA_part[((bt.b * M + m) * a.dim + bt.d0) * N + cn] = sdA[m * a_stride + cn];
  }
  for (int i = threadIdx.x; i < M * bt.nc; i += kThreads) {
    const int m = i / bt.nc, cc = i % bt.nc;
    const int64_t at = (bt.b * M + m) * a.dim + bt.d0 + cc;
    if (o.dD_part != nullptr) o.dD_part[at] = sdD[m * kChannels + cc];
    if (o.ddelta_bias_part != nullptr) o.ddelta_bias_part[at] = sdBias[m * kChannels + cc];
  }
}

}  // namespace scan_cuda
}  // namespace momoe
