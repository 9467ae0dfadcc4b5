// Device helpers shared by the CUDA selective-scan kernels (see selective_scan_cuda_kernel.h):
// element conversions, fast math, the segmented warp scan and the shared-memory tile I/O.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "selective_scan/selective_scan_cuda_kernel.h"

namespace momoe {
namespace scan_cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr unsigned kFullMask = 0xffffffffu;

// Explicit conversions (torch builds CUDA sources with __CUDA_NO_{HALF,BFLOAT16}_CONVERSIONS__).
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}

// 2^x by the SFU (relative error ~2^-22; flushes results below 2^-126 to zero).
__device__ __forceinline__ float exp2_approx(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else  // a host compilation of the kernels (e.g. an emulation)
  return exp2f(x);
#endif
}

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// mamba-ssm's softplus: log1p(exp(x)), x itself above 20.
__device__ __forceinline__ float softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

// Inclusive scan of the maps h -> a h + b over the kLanes lanes of a segment of a warp: on return,
// lane s holds the composition of lanes 0..s (kReverse: of lanes s..kLanes-1, the last applied
// first). Every lane of the warp must call it.
template <int kLanes, bool kReverse>
__device__ __forceinline__ void segment_scan(float& a, float& b) {
  static_assert(kLanes >= 2 && kLanes <= 32 && (kLanes & (kLanes - 1)) == 0, "kLanes: a power of two <= 32");
  const int lane = threadIdx.x % kLanes;
#pragma unroll
  for (int d = 1; d < kLanes; d *= 2) {
    const float an = kReverse ? __shfl_down_sync(kFullMask, a, d, kLanes) : __shfl_up_sync(kFullMask, a, d, kLanes);
    const float bn = kReverse ? __shfl_down_sync(kFullMask, b, d, kLanes) : __shfl_up_sync(kFullMask, b, d, kLanes);
    if (kReverse ? lane + d < kLanes : lane >= d) {
      b = a * bn + b;
      a = a * an;
    }
  }
}

// Sum over the kLanes lanes of a segment (every lane gets the total).
template <int kLanes>
__device__ __forceinline__ float segment_sum(float v) {
#pragma unroll
  for (int d = kLanes / 2; d > 0; d /= 2) v += __shfl_xor_sync(kFullMask, v, d, kLanes);
  return v;
}

// Position of step t of channel c in a kChannels x kChunk fp32 tile in shared memory: each lane's
// kItems steps are contiguous and 16-byte aligned, padded by 4 floats (conflict-free 16-byte reads by
// the 8 lanes of a quarter warp), and rows are padded by 4 more (so that time-major accesses, which
// walk the channels, spread over the banks).
template <int kItems>
struct Tile {
  static constexpr int kRow = static_cast<int>(tile_row_floats(kItems));
  __device__ static __forceinline__ int index(int c, int t) {
    return c * kRow + (t / kItems) * (kItems + 4) + t % kItems;
  }
};

// Slot of step i of lane s in a chunk's per-step arrays in shared memory (modality ids, dB/dC sums):
// a lane's kItems steps stay together, rotated by s / (32 / kItems), so that the lanes of a warp
// touching their step i, and 32 consecutive steps, fall in different banks.
template <int kItems>
__device__ __forceinline__ int step_slot(int s, int i) {
  return s * kItems + (i + s / (32 / kItems)) % kItems;
}
template <int kItems>
__device__ __forceinline__ int step_slot(int t) {
  return step_slot<kItems>(t / kItems, t % kItems);
}

// The modality ids of a lane's kItems steps, read from the chunk's ids in shared memory.
template <int kItems>
struct LaneIds {
  const int* smod;
  int s;
  __device__ __forceinline__ int operator[](int i) const { return smod[step_slot<kItems>(s, i)]; }
};

// K consecutive elements of T, loaded and stored as one vector.
template <typename T, int K>
struct alignas(K * sizeof(T)) Pack {
  T v[K];
};

template <int kBytes>
__device__ __forceinline__ bool aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % kBytes == 0;
}

// Vector widths of the tile I/O: 16 bytes along time (channel-major tensors); along channels
// (time-major tensors) 16 bytes or, when less, the tile's kChannels channels of one step.
template <typename T, int kChannels>
struct TileVec {
  static constexpr int kTime = 16 / sizeof(T);
  static constexpr int kChan = kChannels < kTime ? kChannels : kTime;
};

// tile[c][t] = src[c * cs + t * ts] as fp32 for c < nc, t < len; 0 elsewhere in the tile. `src` is
// element (b, d0, t0) of a (batch, dim, L) tensor. Consecutive threads read consecutive addresses:
// along time for a channel-major tensor (ts == 1), along channels otherwise; vectors when the strides
// and the address allow. The caller synchronises the block before reading the tile.
template <typename T, int kChannels, int kItems, int kThreads>
__device__ void load_tile(float* tile, const T* src, int64_t cs, int64_t ts, int nc, int len) {
  using Tl = Tile<kItems>;
  constexpr int kVt = TileVec<T, kChannels>::kTime, kVc = TileVec<T, kChannels>::kChan;
  static_assert(kItems % kVt == 0 && kChannels % kVc == 0, "a vector must fit in a lane's steps and a row");
  if (ts == 1 && len == kChunk && cs % kVt == 0 && aligned<kVt * sizeof(T)>(src)) {
    for (int i = threadIdx.x; i < kChannels * (kChunk / kVt); i += kThreads) {
      const int c = i / (kChunk / kVt), t = (i % (kChunk / kVt)) * kVt;
      float4* dst = reinterpret_cast<float4*>(tile + Tl::index(c, t));
      if (c < nc) {
        const Pack<T, kVt> p = *reinterpret_cast<const Pack<T, kVt>*>(src + c * cs + t);
#pragma unroll
        for (int k = 0; k < kVt; k += 4)
          dst[k / 4] = make_float4(to_float(p.v[k]), to_float(p.v[k + 1]), to_float(p.v[k + 2]), to_float(p.v[k + 3]));
      } else {
#pragma unroll
        for (int k = 0; k < kVt; k += 4) dst[k / 4] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      }
    }
  } else if (cs == 1 && nc == kChannels && ts % kVc == 0 && aligned<kVc * sizeof(T)>(src)) {
    for (int i = threadIdx.x; i < kChunk * (kChannels / kVc); i += kThreads) {
      const int t = i / (kChannels / kVc), c = (i % (kChannels / kVc)) * kVc;
      if (t < len) {
        const Pack<T, kVc> p = *reinterpret_cast<const Pack<T, kVc>*>(src + t * ts + c);
#pragma unroll
        for (int k = 0; k < kVc; ++k) tile[Tl::index(c + k, t)] = to_float(p.v[k]);
      } else {
#pragma unroll
        for (int k = 0; k < kVc; ++k) tile[Tl::index(c + k, t)] = 0.0f;
      }
    }
  } else {
    const bool along_time = ts == 1;
    for (int i = threadIdx.x; i < kChannels * kChunk; i += kThreads) {
      const int c = along_time ? i / kChunk : i % kChannels;
      const int t = along_time ? i % kChunk : i / kChannels;
      tile[Tl::index(c, t)] = (c < nc && t < len) ? to_float(src[c * cs + t * ts]) : 0.0f;
    }
  }
}

// dst[c * cs + t * ts] = tile[c][t] rounded to T, for c < nc, t < len (the inverse of load_tile).
template <typename T, int kChannels, int kItems, int kThreads>
__device__ void store_tile(T* dst, const float* tile, int64_t cs, int64_t ts, int nc, int len) {
  using Tl = Tile<kItems>;
  constexpr int kVt = TileVec<T, kChannels>::kTime, kVc = TileVec<T, kChannels>::kChan;
  if (ts == 1 && len == kChunk && cs % kVt == 0 && aligned<kVt * sizeof(T)>(dst)) {
    for (int i = threadIdx.x; i < nc * (kChunk / kVt); i += kThreads) {
      const int c = i / (kChunk / kVt), t = (i % (kChunk / kVt)) * kVt;
      const float4* src = reinterpret_cast<const float4*>(tile + Tl::index(c, t));
      Pack<T, kVt> p;
#pragma unroll
      for (int k = 0; k < kVt; k += 4) {
        const float4 f = src[k / 4];
        p.v[k] = from_float<T>(f.x);
        p.v[k + 1] = from_float<T>(f.y);
        p.v[k + 2] = from_float<T>(f.z);
        p.v[k + 3] = from_float<T>(f.w);
      }
      *reinterpret_cast<Pack<T, kVt>*>(dst + c * cs + t) = p;
    }
  } else if (cs == 1 && nc == kChannels && ts % kVc == 0 && aligned<kVc * sizeof(T)>(dst)) {
    for (int i = threadIdx.x; i < len * (kChannels / kVc); i += kThreads) {
      const int t = i / (kChannels / kVc), c = (i % (kChannels / kVc)) * kVc;
      Pack<T, kVc> p;
#pragma unroll
      for (int k = 0; k < kVc; ++k) p.v[k] = from_float<T>(tile[Tl::index(c + k, t)]);
      *reinterpret_cast<Pack<T, kVc>*>(dst + t * ts + c) = p;
    }
  } else {
    const bool along_time = ts == 1;
    for (int i = threadIdx.x; i < kChannels * kChunk; i += kThreads) {
      const int c = along_time ? i / kChunk : i % kChannels;
      const int t = along_time ? i % kChunk : i / kChannels;
      if (c < nc && t < len) dst[c * cs + t * ts] = from_float<T>(tile[Tl::index(c, t)]);
    }
  }
}

// A lane's kItems consecutive steps of channel c (lane s: steps s * kItems ...) from / to a tile.
template <int kItems>
__device__ __forceinline__ void read_items(const float* tile, int c, int s, float (&v)[kItems]) {
  const float4* p = reinterpret_cast<const float4*>(tile + Tile<kItems>::index(c, s * kItems));
#pragma unroll
  for (int k = 0; k < kItems; k += 4) {
    const float4 f = p[k / 4];
    v[k] = f.x;
    v[k + 1] = f.y;
    v[k + 2] = f.z;
    v[k + 3] = f.w;
  }
}

template <int kItems>
__device__ __forceinline__ void write_items(float* tile, int c, int s, const float (&v)[kItems]) {
  float4* p = reinterpret_cast<float4*>(tile + Tile<kItems>::index(c, s * kItems));
#pragma unroll
  for (int k = 0; k < kItems; k += 4) p[k / 4] = make_float4(v[k], v[k + 1], v[k + 2], v[k + 3]);
}

// kItems consecutive fp32 values p[0 .. kItems) (16-byte aligned: B and C rows are padded to whole chunks).
template <int kItems>
__device__ __forceinline__ void load_row_items(const float* p, float (&v)[kItems]) {
#pragma unroll
  for (int k = 0; k < kItems; k += 4) {
    const float4 f = __ldg(reinterpret_cast<const float4*>(p) + k / 4);
    v[k] = f.x;
    v[k + 1] = f.y;
    v[k + 2] = f.z;
    v[k + 3] = f.w;
  }
}

// The per-modality tables of a block's channels, in shared memory: A * log2(e) as
// sA[m * a_stride + c * N + n] (a_stride = kChannels * N + 1: rows of different modalities fall in
// different banks) and, for D and delta_bias, s[m * kChannels + c]. Channels >= nc get zeros.
template <int kChannels, int kThreads>
__device__ void load_tables(float* sA, float* sD, float* sBias, const ScanArgs& a, int64_t d0, int nc) {
  const int N = static_cast<int>(a.N);
  const int a_stride = kChannels * N + 1;
  for (int i = threadIdx.x; i < a.M * kChannels * N; i += kThreads) {
    const int m = i / (kChannels * N), c = (i / N) % kChannels, n = i % N;
    sA[m * a_stride + c * N + n] = c < nc ? a.A[(m * a.dim + d0 + c) * N + n] * kLog2e : 0.0f;
  }
  for (int i = threadIdx.x; i < a.M * kChannels; i += kThreads) {
    const int m = i / kChannels, c = i % kChannels;
    const int64_t j = m * a.dim + d0 + c;
    sD[i] = (a.D != nullptr && c < nc) ? a.D[j] : 0.0f;
    sBias[i] = (a.delta_bias != nullptr && c < nc) ? a.delta_bias[j] : 0.0f;
  }
}

// The chunk's modality ids in shared memory, at step_slot<kItems>(t) (clamped into [0, M); 0 without
// modality; past L, the chunk's first id); returns true when the chunk has a single modality.
// Contains a block barrier.
template <int kItems, int kThreads>
__device__ __forceinline__ bool load_chunk_modality(int* smod, const ScanArgs& a, int64_t b, int64_t t0, int len) {
  if (a.modality == nullptr) {
    for (int t = threadIdx.x; t < kChunk; t += kThreads) smod[t] = 0;
    __syncthreads();
    return true;
  }
  const int32_t* mod = a.modality + b * a.L + t0;
  const int last = static_cast<int>(a.M) - 1;
  const int first = min(max(mod[0], 0), last);
  bool same = true;
  for (int t = threadIdx.x; t < kChunk; t += kThreads) {
    const int m = t < len ? min(max(mod[t], 0), last) : first;
    smod[step_slot<kItems>(t)] = m;
    same = same && m == first;
  }
  return __syncthreads_and(same) != 0;
}

// Adds the lane's values v[i] (steps of modality mod[i]) to cell[m * stride] for channel c's table
// cell (table + c): with a uniform chunk, summed over the channel's kLanes lanes and added once by
// lane 0 (a channel's lanes form one segment of a warp, so that add has no competitor); otherwise
// each run of equal ids in the lane adds atomically.
template <int kLanes, int kItems>
__device__ __forceinline__ void add_by_modality(bool uniform, float* cell, int stride, const LaneIds<kItems>& mod,
                                                const float (&v)[kItems]) {
  if (uniform) {
    float acc = 0.0f;
#pragma unroll
    for (int i = 0; i < kItems; ++i) acc += v[i];
    acc = segment_sum<kLanes>(acc);
    if (threadIdx.x % kLanes == 0) cell[mod[0] * stride] += acc;
    return;
  }
  float acc = 0.0f;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    acc += v[i];
    if (i == kItems - 1 || mod[i + 1] != mod[i]) {
      atomicAdd(cell + mod[i] * stride, acc);
      acc = 0.0f;
    }
  }
}

// Block coordinates: (batch, group, first channel, channel count) of a block of a (batch, G,
// tiles per group) grid; a tile never straddles two groups.
struct BlockTile {
  int64_t b, g, d0;
  int nc;
};

template <int kChannels>
__device__ __forceinline__ BlockTile block_tile(const ScanArgs& a) {
  const int64_t dpg = a.dim / a.G;
  const int64_t tpg = (dpg + kChannels - 1) / kChannels;
  const int64_t blk = blockIdx.x;
  BlockTile bt;
  bt.b = blk / (a.G * tpg);
  bt.g = (blk / tpg) % a.G;
  const int64_t c0 = (blk % tpg) * kChannels;
  bt.d0 = bt.g * dpg + c0;
  bt.nc = static_cast<int>(dpg - c0 < kChannels ? dpg - c0 : kChannels);
  return bt;
}

inline int64_t num_blocks(const ScanArgs& a, int channels) {
  const int64_t dpg = a.dim / a.G;
  return a.batch * a.G * ((dpg + channels - 1) / channels);
}

}  // namespace scan_cuda
}  // namespace momoe
