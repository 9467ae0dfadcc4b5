// Forward kernel of the CUDA selective scan (work split: selective_scan_cuda_kernel.h). Included once
// per dtype by selective_scan_fwd_{fp32,bf16,fp16}.cu.
#pragma once
#include "selective_scan/selective_scan_cuda_common.cuh"

namespace momoe {
namespace scan_cuda {

// The scan of one chunk for one lane (kItems steps of channel c), over every state row n:
// y[i] += sum_n h_i[n] C_i[n]. sAc: the channel's A * log2(e) table (row m at m * a_stride), sHc: its
// carried state (in: at the chunk start, out: at the chunk end), smod_lane: the lane's modality ids,
// B_lane / C_lane: the lane's first step of row n = 0 (rows Lp apart), chunk_state: where the state at
// the chunk start goes (nullptr for padding channels). kMixed: the chunk has several modalities (A
// per step), otherwise every step uses row smod_lane[0].
template <int kItems, bool kMixed>
__device__ __forceinline__ void fwd_chunk_states(float (&y)[kItems], const float (&dt)[kItems],
                                                 const float (&du)[kItems], const float* sAc, int a_stride,
                                                 float* sHc, const LaneIds<kItems>& smod_lane,
                                                 const float* B_lane, const float* C_lane, int64_t Lp, int N,
                                                 float* chunk_state) {
  constexpr int kLanes = kChunk / kItems;
  const int s = threadIdx.x % kLanes;
  const float* sA0 = sAc + smod_lane[0] * a_stride;
#pragma unroll 1
  for (int n = 0; n < N; ++n) {
    float Bv[kItems], Cv[kItems], av[kItems], bv[kItems];
    load_row_items<kItems>(B_lane + n * Lp, Bv);
    load_row_items<kItems>(C_lane + n * Lp, Cv);
    const float A0 = sA0[n];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const float A2 = kMixed ? sAc[smod_lane[i] * a_stride + n] : A0;
      av[i] = exp2_approx(dt[i] * A2);
      bv[i] = du[i] * Bv[i];
    }
    // The lane's steps composed: h -> P h + Q.
    float P = av[0], Q = bv[0];
#pragma unroll
    for (int i = 1; i < kItems; ++i) {
      Q = av[i] * Q + bv[i];
      P = av[i] * P;
    }
    float h0 = 0.0f;
    if (s == 0) {  // the first lane starts from the carried state
      h0 = sHc[n];
      if (chunk_state != nullptr) chunk_state[n] = h0;
      Q = P * h0 + Q;
      P = 0.0f;
    }
    segment_scan<kLanes, false>(P, Q);  // Q: the state after this lane's last step
    float h = __shfl_up_sync(kFullMask, Q, 1, kLanes);
    if (s == 0) h = h0;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      h = av[i] * h + bv[i];
      y[i] += h * Cv[i];
    }
    if (s == kLanes - 1) sHc[n] = h;
  }
}

template <typename T, int kChannels, int kItems>
__global__ void __launch_bounds__(kChannels * (kChunk / kItems), 2)
    selective_scan_fwd_kernel(const ScanArgs a, const FwdOut o) {
  constexpr int kLanes = kChunk / kItems;
  constexpr int kThreads = kChannels * kLanes;
  using Tl = Tile<kItems>;
  const int N = static_cast<int>(a.N), M = static_cast<int>(a.M);
  const int a_stride = kChannels * N + 1;
  extern __shared__ float4 smem_f4[];
  float* tile0 = reinterpret_cast<float*>(smem_f4);
  float* tile1 = tile0 + kChannels * Tl::kRow;
  float* sA = tile1 + kChannels * Tl::kRow;
  float* sD = sA + M * a_stride;
  float* sBias = sD + M * kChannels;
  float* sH = sBias + M * kChannels;
  int* smod = reinterpret_cast<int*>(sH + kChannels * N);

  const BlockTile bt = block_tile<kChannels>(a);
  const int c = threadIdx.x / kLanes, s = threadIdx.x % kLanes;
  const bool active = c < bt.nc;
  load_tables<kChannels, kThreads>(sA, sD, sBias, a, bt.d0, bt.nc);
  for (int i = threadIdx.x; i < kChannels * N; i += kThreads) {
    const int cc = i / N;
    sH[i] = (a.initial_state != nullptr && cc < bt.nc) ? a.initial_state[(bt.b * a.dim + bt.d0) * N + i] : 0.0f;
  }
  // (the barrier in load_chunk_modality orders the writes above before their first reads)

  const T* u = static_cast<const T*>(a.u);
  const T* delta = static_cast<const T*>(a.delta);
  const T* z = static_cast<const T*>(a.z);
  T* out = static_cast<T*>(o.out);
  const int64_t n_chunks = num_chunks(a.L);
  const int64_t Lp = n_chunks * kChunk;
  const int64_t bc_row = (bt.b * a.G + bt.g) * N * Lp;
  for (int64_t ci = 0; ci < n_chunks; ++ci) {
    const int64_t t0 = ci * kChunk;
    const int len = static_cast<int>(a.L - t0 < kChunk ? a.L - t0 : kChunk);
    load_tile<T, kChannels, kItems, kThreads>(tile0, delta + bt.b * a.ldelta.b + bt.d0 * a.ldelta.c + t0 * a.ldelta.t,
                                              a.ldelta.c, a.ldelta.t, bt.nc, len);
    load_tile<T, kChannels, kItems, kThreads>(tile1, u + bt.b * a.lu.b + bt.d0 * a.lu.c + t0 * a.lu.t, a.lu.c,
                                              a.lu.t, bt.nc, len);
    const bool uniform = load_chunk_modality<kItems, kThreads>(smod, a, bt.b, t0, len);
    const LaneIds<kItems> smod_lane{smod, s};

    float dt[kItems], du[kItems], y[kItems];
    read_items<kItems>(tile0, c, s, dt);
    read_items<kItems>(tile1, c, s, du);  // u for now
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      float x = dt[i] + sBias[smod_lane[i] * kChannels + c];
      if (a.softplus) x = softplus(x);
      dt[i] = s * kItems + i < len ? x : 0.0f;  // steps past the end leave the state unchanged
      du[i] *= dt[i];
      y[i] = 0.0f;
    }
    const float* B_lane = a.B + bc_row + t0 + s * kItems;
    const float* C_lane = a.C + bc_row + t0 + s * kItems;
    float* chunk_state = active ? o.chunk_states + ((bt.b * a.dim + bt.d0 + c) * n_chunks + ci) * N : nullptr;
    if (uniform) {
      fwd_chunk_states<kItems, false>(y, dt, du, sA + c * N, a_stride, sH + c * N, smod_lane, B_lane, C_lane, Lp, N,
                                      chunk_state);
    } else {
      fwd_chunk_states<kItems, true>(y, dt, du, sA + c * N, a_stride, sH + c * N, smod_lane, B_lane, C_lane, Lp, N,
                                     chunk_state);
    }

    // Epilogue: out = (y + D u) * silu(z), written over this lane's own steps of the z tile (or of u's).
    if (z != nullptr) {
      __syncthreads();  // every lane has read delta
      load_tile<T, kChannels, kItems, kThreads>(tile0, z + bt.b * a.lz.b + bt.d0 * a.lz.c + t0 * a.lz.t, a.lz.c,
                                                a.lz.t, bt.nc, len);
      __syncthreads();
    }
    float uv[kItems], zv[kItems];
    read_items<kItems>(tile1, c, s, uv);
    if (z != nullptr) read_items<kItems>(tile0, c, s, zv);
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      y[i] += sD[smod_lane[i] * kChannels + c] * uv[i];
      if (z != nullptr) y[i] *= zv[i] * sigmoid(zv[i]);
    }
    float* out_tile = z != nullptr ? tile0 : tile1;
    write_items<kItems>(out_tile, c, s, y);
    __syncthreads();
    store_tile<T, kChannels, kItems, kThreads>(out + bt.b * o.lout.b + bt.d0 * o.lout.c + t0 * o.lout.t, out_tile,
                                               o.lout.c, o.lout.t, bt.nc, len);
    __syncthreads();  // the next chunk overwrites the tiles
  }
  for (int i = threadIdx.x; i < bt.nc * N; i += kThreads) o.last_state[(bt.b * a.dim + bt.d0) * N + i] = sH[i];
}

}  // namespace scan_cuda
}  // namespace momoe
