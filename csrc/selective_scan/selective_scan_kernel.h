// Torch-free CPU core of the (modality-split) selective scan: forward, backward and decode step.
//
// Layout: u, delta, z, out: (batch, dim, L) in T with strides of their own (see Layout); B, C: (batch, G, L, N) fp32
// (time-major: the caller transposes mamba-ssm's (batch, G, N, L), whose N rows 4 KiB apart would
// collide in the L1 sets);
// A: (M, dim, N) fp32; D, delta_bias: (M, dim) fp32; modality: (batch, L) int32 in [0, M)
// (M = 1 and modality == nullptr without modality); initial/last state: (batch, dim, N) fp32;
// chunk_states: (batch, dim, ceil(L / 256), N) fp32, the state before timestep 256 * c.
//
// Work split: a tile is kTile = 16 channels of one (batch, group); its loops run over the 16
// channels innermost so they vectorize (one 512-bit vector, or two 256-bit ones), time runs
// sequentially, the state h[N][16] stays in L1. Per-token modality picks rows of small
// per-tile tables (A, D, delta_bias), so the split costs no extra pass.
// Backward: per tile, chunks of 256 steps in reverse: recompute the chunk's states and decay
// factors from chunk_states into a local buffer, then a reverse scan for the gradients. dB/dC
// (sums over channels) go to per-block partial buffers (a block = up to kBlockTiles tiles,
// visited in a fixed order), dA/dD/ddelta_bias to per-batch partial buffers; the caller sums the
// partials in a fixed order, so results do not depend on the thread count.
//
// The kernels live in momoe::<MOMOE_ISA_NS>::scan (see simd_math.h); the argument structs are
// shared by every instruction set. The loops are written for GCC's auto-vectorizer; the AVX-512
// build (MOMOE_SCAN_AVX512) replaces two hot spots with intrinsics: the state step (exp by
// vscalefps) and the (channel, time) <-> (time, channel) tile transposes (16 x 16 in registers).
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/bfloat16.h"
#include "common/simd_math.h"

namespace momoe {
namespace scan {

constexpr int64_t kChunk = 256;   // timesteps per saved chunk state
constexpr int kTile = 16;         // channels per tile (the vector dimension)
constexpr int64_t kBlockTiles = 4;  // tiles per backward task (shares one dB/dC partial buffer)

// Element strides of a (batch, dim, L) tensor: mamba-ssm's layout is {dim * L, L, 1} ("channel-major");
// a transpose of a (batch, L, dim) activation is {L * dim, 1, dim} ("time-major", what linear layers
// produce). Tiles of either layout load without copies; other strides take a scalar path.
struct Layout {
  int64_t b, c, t;
};

inline int64_t offset_of(const Layout& l, int64_t b, int64_t c, int64_t t) { return b * l.b + c * l.c + t * l.t; }

template <typename T>
struct ScanArgs {
  int64_t batch, dim, L, N, G, M;
  const T* u;
  const T* delta;
  const T* z;                  // nullable
  Layout lu, ldelta, lz;
  const float* A;              // (M, dim, N)
  const float* B;              // (batch, G, L, N)
  const float* C;              // (batch, G, L, N)
  const float* D;              // (M, dim), nullable
  const float* delta_bias;     // (M, dim), nullable
  const int32_t* modality;     // (batch, L), nullable
  const float* initial_state;  // (batch, dim, N), nullable
  bool softplus;
};

template <typename T>
struct FwdOut {
  T* out;               // (batch, dim, L)
  Layout lout;
  float* last_state;    // (batch, dim, N)
  float* chunk_states;  // (batch, dim, n_chunks, N)
};

template <typename T>
struct BwdOut {
  const T* dout;               // (batch, dim, L)
  const float* dlast_state;    // (batch, dim, N), nullable
  const float* chunk_states;   // (batch, dim, n_chunks, N)
  T* du;                       // (batch, dim, L)
  T* ddelta;                   // (batch, dim, L)
  T* dz;                       // (batch, dim, L), nullable (when z is)
  Layout ldout, ldu, lddelta, ldz;
  float* dB_part;              // (batch, G, n_blocks, L, N), zero-initialised
  float* dC_part;              // (batch, G, n_blocks, L, N), zero-initialised
  float* dA_part;              // (batch, M, dim, N)
  float* dD_part;              // (batch, M, dim), nullable
  float* ddelta_bias_part;     // (batch, M, dim), nullable
  float* dinitial_state;       // (batch, dim, N), nullable
};

// Decode step: one token, state updated in place.
template <typename T, typename S>
struct StepArgs {
  int64_t batch, dim, N, G, M;
  S* state;                // (batch, dim, N)
  const T* x;              // (batch, dim)
  const T* dt;             // (batch, dim)
  const T* z;              // (batch, dim), nullable
  const float* A;          // (M, dim, N)
  const float* B;          // (batch, G, N)
  const float* C;          // (batch, G, N)
  const float* D;          // (M, dim), nullable
  const float* dt_bias;    // (M, dim), nullable
  const int32_t* modality; // (batch,), nullable
  bool softplus;
  T* y;                    // (batch, dim)
};

inline int64_t num_chunks(int64_t L) { return (L + kChunk - 1) / kChunk; }
inline int64_t tiles_per_group(int64_t dim, int64_t G) { return (dim / G + kTile - 1) / kTile; }
inline int64_t blocks_per_group(int64_t dim, int64_t G) {
  return (tiles_per_group(dim, G) + kBlockTiles - 1) / kBlockTiles;
}
// Forward tasks are tiles; backward tasks are blocks of tiles.
inline int64_t fwd_num_tasks(int64_t batch, int64_t dim, int64_t G) {
  return G == 0 ? 0 : batch * G * tiles_per_group(dim, G);
}
inline int64_t bwd_num_tasks(int64_t batch, int64_t dim, int64_t G) {
  return G == 0 ? 0 : batch * G * blocks_per_group(dim, G);
}
// Scratch floats one thread needs (the caller allocates them once per thread).
inline int64_t fwd_scratch_floats(int64_t N, int64_t M) {
  return (M * N + 2 * M + N + 5 * kChunk) * kTile;
}
inline int64_t bwd_scratch_floats(int64_t N, int64_t M) {
  return (2 * M * N + 4 * M + 2 * N + (2 * kChunk + 1) * N + 9 * kChunk + 2 * kTile) * kTile;
}

}  // namespace scan

namespace MOMOE_ISA_NS {
namespace scan {

using momoe::scan::BwdOut;
using momoe::scan::FwdOut;
using momoe::scan::kBlockTiles;
using momoe::scan::kChunk;
using momoe::scan::kTile;
using momoe::scan::ScanArgs;
using momoe::scan::StepArgs;
using momoe::scan::Layout;
using momoe::scan::offset_of;

// out[n] = sum_c X[n * 16 + c] for a 16 x 16 block: a transpose-and-add tree (45 shuffles and adds
// instead of 16 horizontal reductions), written with GCC vector extensions.
inline void row_sums_16x16(const float* __restrict X, float* __restrict out) {
  typedef float vf __attribute__((vector_size(64)));
  typedef int32_t vi __attribute__((vector_size(64)));
  const vi lo8 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const vi hi8 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
  const vi lo4 = {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27};
  const vi hi4 = {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31};
  const vi lo2 = {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29};
  const vi hi2 = {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31};
  const vi lo1 = {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30};
  const vi hi1 = {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31};
  // After the tree, lane j holds the sum of row bitreverse4(j).
  const vi bitrev = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
  vf r[16];
  for (int i = 0; i < 16; ++i) std::memcpy(&r[i], X + 16 * i, sizeof(vf));
  vf t8[8], t4[4], t2[2];
  for (int i = 0; i < 8; ++i)
    t8[i] = __builtin_shuffle(r[2 * i], r[2 * i + 1], lo8) + __builtin_shuffle(r[2 * i], r[2 * i + 1], hi8);
  for (int i = 0; i < 4; ++i)
    t4[i] = __builtin_shuffle(t8[2 * i], t8[2 * i + 1], lo4) + __builtin_shuffle(t8[2 * i], t8[2 * i + 1], hi4);
  for (int i = 0; i < 2; ++i)
    t2[i] = __builtin_shuffle(t4[2 * i], t4[2 * i + 1], lo2) + __builtin_shuffle(t4[2 * i], t4[2 * i + 1], hi2);
  vf s = __builtin_shuffle(t2[0], t2[1], lo1) + __builtin_shuffle(t2[0], t2[1], hi1);
  s = __builtin_shuffle(s, bitrev);
  std::memcpy(out, &s, sizeof(vf));
}

// Load of a (channels, time) slab into the tile layout: dst[t * 16 + c] = src[c * cs + t * ts] for
// c < nc (0 beyond), t in [t0, len).
template <typename T>
inline void load_tile_scalar(float* __restrict dst, const T* __restrict src, int64_t cs, int64_t ts, int nc,
                             int64_t t0, int64_t len) {
  for (int c = 0; c < kTile; ++c) {
    if (c < nc) {
      for (int64_t t = t0; t < len; ++t) dst[t * kTile + c] = load_float(src, c * cs + t * ts);
    } else {
      for (int64_t t = t0; t < len; ++t) dst[t * kTile + c] = 0.0f;
    }
  }
}

template <typename T>
inline void store_tile_scalar(T* __restrict dst, const float* __restrict src, int64_t cs, int64_t ts, int nc,
                              int64_t t0, int64_t len) {
  for (int c = 0; c < nc; ++c)
    for (int64_t t = t0; t < len; ++t) store_float(dst, c * cs + t * ts, src[t * kTile + c]);
}

#if defined(MOMOE_SCAN_AVX512)
// In-place transpose of a 16 x 16 block of rows r[0..15]: four butterfly stages; the stage of
// distance d swaps bit log2(d) of the row index with the same bit of the column index.
inline void transpose_16x16(__m512* r) {
  static const int32_t kLo[4][16] = {
      {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
      {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
      {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
      {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30}};
  static const int32_t kHi[4][16] = {
      {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31},
      {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31},
      {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31},
      {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31}};
  for (int s = 0, d = 8; s < 4; ++s, d /= 2) {
    const __m512i lo = _mm512_loadu_si512(kLo[s]), hi = _mm512_loadu_si512(kHi[s]);
    for (int i = 0; i < 16; ++i) {
      if (i & d) continue;
      const __m512 a = r[i], b = r[i + d];
      r[i] = _mm512_permutex2var_ps(a, lo, b);
      r[i + d] = _mm512_permutex2var_ps(a, hi, b);
    }
  }
}

// 16 consecutive elements as fp32, and back (bfloat16 by its bits, rounding to nearest even).
template <typename T>
inline __m512 load16(const T* p) {
  if constexpr (std::is_same<T, float>::value) {
    return _mm512_loadu_ps(p);
  } else if constexpr (is_bfloat16<T>::value) {
    const __m512i bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
  } else {
    alignas(64) float f[16];
    for (int i = 0; i < 16; ++i) f[i] = static_cast<float>(p[i]);
    return _mm512_load_ps(f);
  }
}

template <typename T>
inline void store16(T* p, __m512 v) {
  if constexpr (std::is_same<T, float>::value) {
    _mm512_storeu_ps(p, v);
  } else if constexpr (is_bfloat16<T>::value) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  } else {
    alignas(64) float f[16];
    _mm512_store_ps(f, v);
    for (int i = 0; i < 16; ++i) p[i] = T(f[i]);
  }
}

// Full tiles: channel-major sources go through 16 x 16 register transposes, time-major ones are
// 16 contiguous channels per step; a partial tile, a time tail or other strides go scalar.
template <typename T>
inline void load_tile(float* __restrict dst, const T* __restrict src, int64_t cs, int64_t ts, int nc, int64_t len) {
  int64_t t = 0;
  if (nc == kTile && ts == 1) {
    for (; t + 16 <= len; t += 16) {
      __m512 r[16];
      for (int c = 0; c < 16; ++c) r[c] = load16(src + c * cs + t);
      transpose_16x16(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + (t + i) * kTile, r[i]);
    }
  } else if (nc == kTile && cs == 1) {
    for (; t < len; ++t) _mm512_storeu_ps(dst + t * kTile, load16(src + t * ts));
  }
  load_tile_scalar(dst, src, cs, ts, nc, t, len);
}

template <typename T>
inline void store_tile(T* __restrict dst, const float* __restrict src, int64_t cs, int64_t ts, int nc, int64_t len) {
  int64_t t = 0;
  if (nc == kTile && ts == 1) {
    for (; t + 16 <= len; t += 16) {
      __m512 r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + (t + i) * kTile);
      transpose_16x16(r);
      for (int c = 0; c < 16; ++c) store16(dst + c * cs + t, r[c]);
    }
  } else if (nc == kTile && cs == 1) {
    for (; t < len; ++t) store16(dst + t * ts, _mm512_loadu_ps(src + t * kTile));
  }
  store_tile_scalar(dst, src, cs, ts, nc, t, len);
}
#else
template <typename T>
inline void load_tile(float* __restrict dst, const T* __restrict src, int64_t cs, int64_t ts, int nc, int64_t len) {
  load_tile_scalar(dst, src, cs, ts, nc, 0, len);
}

template <typename T>
inline void store_tile(T* __restrict dst, const float* __restrict src, int64_t cs, int64_t ts, int nc, int64_t len) {
  store_tile_scalar(dst, src, cs, ts, nc, 0, len);
}
#endif

// Per-tile parameter tables, channel-minor: At[(m * N + n) * 16 + c], Dt/dbt[m * 16 + c].
inline void load_tables(const float* A, const float* D, const float* db, int64_t dim, int64_t N, int64_t M,
                        int64_t d0, int nc, float* At, float* Dt, float* dbt) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n)
      for (int c = 0; c < kTile; ++c) At[(m * N + n) * kTile + c] = c < nc ? A[(m * dim + d0 + c) * N + n] : 0.0f;
    for (int c = 0; c < kTile; ++c) {
      Dt[m * kTile + c] = (D != nullptr && c < nc) ? D[m * dim + d0 + c] : 0.0f;
      dbt[m * kTile + c] = (db != nullptr && c < nc) ? db[m * dim + d0 + c] : 0.0f;
    }
  }
}

// dt = softplus(delta + bias[m]) (or without softplus), in place on dtb; du = dt * u in place on
// dub (which holds u on entry); sg (nullable) = d dt / d (delta + bias).
#if defined(MOMOE_SCAN_AVX512)
inline void prepare_dt(float* __restrict dtb, float* __restrict dub, float* __restrict sg, const float* dbt,
                       const int32_t* mod, int64_t len, bool softplus) {
  for (int64_t t = 0; t < len; ++t) {
    const __m512 x = _mm512_add_ps(_mm512_loadu_ps(dtb + t * kTile),
                                   _mm512_loadu_ps(dbt + (mod != nullptr ? mod[t] : 0) * kTile));
    __m512 dt = x, s = _mm512_set1_ps(1.0f);
    if (softplus) {
      __m512 e;
      dt = simd::softplus16(x, &e);
      const __m512 r = simd::recip16(_mm512_add_ps(_mm512_set1_ps(1.0f), e));  // sigmoid(|x|)
      s = _mm512_mask_mul_ps(r, _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), e, r);
    }
    _mm512_storeu_ps(dtb + t * kTile, dt);
    _mm512_storeu_ps(dub + t * kTile, _mm512_mul_ps(dt, _mm512_loadu_ps(dub + t * kTile)));
    if (sg != nullptr) _mm512_storeu_ps(sg + t * kTile, s);
  }
}
#else
inline void prepare_dt(float* __restrict dtb, float* __restrict dub, float* __restrict sg, const float* dbt,
                       const int32_t* mod, int64_t len, bool softplus) {
  for (int64_t t = 0; t < len; ++t) {
    const float* __restrict bias = dbt + (mod != nullptr ? mod[t] : 0) * kTile;
    float* __restrict dt = dtb + t * kTile;
    float* __restrict du = dub + t * kTile;
    if (softplus) {
      float x[kTile], e[kTile];
      for (int c = 0; c < kTile; ++c) {
        x[c] = dt[c] + bias[c];
        e[c] = simd::softplus_exp(x[c]);
      }
      for (int c = 0; c < kTile; ++c) {
        const float v = simd::softplus_finish(x[c], e[c]);
        dt[c] = v;
        du[c] = v * du[c];
      }
      if (sg != nullptr) {
        float* __restrict s = sg + t * kTile;
        for (int c = 0; c < kTile; ++c) s[c] = simd::sigmoid_from(x[c], e[c]);
      }
    } else {
      for (int c = 0; c < kTile; ++c) {
        const float v = dt[c] + bias[c];
        dt[c] = v;
        du[c] = v * du[c];
      }
      if (sg != nullptr)
        for (int c = 0; c < kTile; ++c) sg[t * kTile + c] = 1.0f;
    }
  }
}
#endif

// One timestep of the scan for the tile's 16 channels: for each state row n,
// a = exp(dt * A[n]) (stored to an[n] when an is non-null), h[n] = a * h[n] + du * B[n], and
// y = sum_n h[n] * C[n] (summed in ascending n).
#if defined(MOMOE_SCAN_AVX512)
// AVX-512: a = 2^(dt log2(e) A) through scalef (no integer exponent tricks, no selects).
inline void scan_step(float* __restrict h, float* __restrict y, float* __restrict an,
                      const float* __restrict dt, const float* __restrict du, const float* __restrict Am,
                      const float* __restrict Bt, const float* __restrict Ct, int64_t N) {
  const __m512 dt2 = _mm512_mul_ps(_mm512_loadu_ps(dt), _mm512_set1_ps(simd::kLog2e));
  const __m512 duv = _mm512_loadu_ps(du);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t n = 0; n < N; ++n) {
    const __m512 a = simd::exp2_16(_mm512_mul_ps(dt2, _mm512_loadu_ps(Am + n * kTile)));
    if (an != nullptr) _mm512_storeu_ps(an + n * kTile, a);
    const __m512 hv = _mm512_fmadd_ps(a, _mm512_loadu_ps(h + n * kTile), _mm512_mul_ps(duv, _mm512_set1_ps(Bt[n])));
    _mm512_storeu_ps(h + n * kTile, hv);
    acc = _mm512_fmadd_ps(hv, _mm512_set1_ps(Ct[n]), acc);
  }
  _mm512_storeu_ps(y, acc);
}
#else
inline void scan_step(float* __restrict h, float* __restrict y, float* __restrict an,
                      const float* __restrict dt, const float* __restrict du, const float* __restrict Am,
                      const float* __restrict Bt, const float* __restrict Ct, int64_t N) {
  float acc[kTile];
  for (int c = 0; c < kTile; ++c) acc[c] = 0.0f;
  for (int64_t n = 0; n < N; ++n) {
    const float bn = Bt[n];
    const float cn = Ct[n];
    float* __restrict hn = h + n * kTile;
    const float* __restrict An = Am + n * kTile;
    if (an != nullptr) {
      float* __restrict ann = an + n * kTile;
      for (int c = 0; c < kTile; ++c) {
        float a = simd::exp_clamped(dt[c] * An[c]);
        ann[c] = a;
        float hv = a * hn[c] + du[c] * bn;
        hn[c] = hv;
        acc[c] += hv * cn;
      }
    } else {
      for (int c = 0; c < kTile; ++c) {
        float a = simd::exp_clamped(dt[c] * An[c]);
        float hv = a * hn[c] + du[c] * bn;
        hn[c] = hv;
        acc[c] += hv * cn;
      }
    }
  }
  for (int c = 0; c < kTile; ++c) y[c] = acc[c];
}
#endif

// The forward's epilogue for one timestep of the tile: y = (y + D u) * silu(z) (no gate when z is null).
#if defined(MOMOE_SCAN_AVX512)
inline void gate_step(float* __restrict y, const float* __restrict Dm, const float* __restrict u,
                      const float* __restrict z) {
  __m512 v = _mm512_fmadd_ps(_mm512_loadu_ps(Dm), _mm512_loadu_ps(u), _mm512_loadu_ps(y));
  if (z != nullptr) v = _mm512_mul_ps(v, simd::silu16(_mm512_loadu_ps(z)));
  _mm512_storeu_ps(y, v);
}
#else
inline void gate_step(float* __restrict y, const float* __restrict Dm, const float* __restrict u,
                      const float* __restrict z) {
  for (int c = 0; c < kTile; ++c) y[c] += Dm[c] * u[c];
  if (z != nullptr)
    for (int c = 0; c < kTile; ++c) y[c] *= simd::silu(z[c]);
}
#endif

// Backward of gate_step for one timestep of the tile, from dout (gout): with the gate, y (the scan
// output before the D skip) is overwritten by dz and dy = dout * silu(z); without, dy = dout. Then
// dyD = dy * D and dD += dy * u.
#if defined(MOMOE_SCAN_AVX512)
inline void gate_bwd_step(float* __restrict y, float* __restrict dy, float* __restrict dyD, float* __restrict dDm,
                          const float* __restrict gout, const float* __restrict z, const float* __restrict u,
                          const float* __restrict Dm) {
  const __m512 g = _mm512_loadu_ps(gout), uv = _mm512_loadu_ps(u), Dv = _mm512_loadu_ps(Dm);
  __m512 dyv = g;
  if (z != nullptr) {
    const __m512 zv = _mm512_loadu_ps(z);
    const __m512 s = simd::sigmoid16(zv);
    const __m512 yv = _mm512_fmadd_ps(Dv, uv, _mm512_loadu_ps(y));
    // dz = dout * yv * s * (1 + z (1 - s))
    const __m512 one = _mm512_set1_ps(1.0f);
    const __m512 dsilu = _mm512_mul_ps(s, _mm512_fmadd_ps(zv, _mm512_sub_ps(one, s), one));
    _mm512_storeu_ps(y, _mm512_mul_ps(_mm512_mul_ps(g, yv), dsilu));
    dyv = _mm512_mul_ps(_mm512_mul_ps(g, zv), s);
  }
  _mm512_storeu_ps(dy, dyv);
  _mm512_storeu_ps(dyD, _mm512_mul_ps(dyv, Dv));
  _mm512_storeu_ps(dDm, _mm512_fmadd_ps(dyv, uv, _mm512_loadu_ps(dDm)));
}
#else
inline void gate_bwd_step(float* __restrict y, float* __restrict dy, float* __restrict dyD, float* __restrict dDm,
                          const float* __restrict gout, const float* __restrict z, const float* __restrict u,
                          const float* __restrict Dm) {
  if (z != nullptr) {
    for (int c = 0; c < kTile; ++c) {
      const float s = simd::sigmoid(z[c]);
      const float yv = y[c] + Dm[c] * u[c];
      y[c] = gout[c] * yv * s * (1.0f + z[c] * (1.0f - s));  // dz
      dy[c] = gout[c] * z[c] * s;
    }
  } else {
    for (int c = 0; c < kTile; ++c) dy[c] = gout[c];
  }
  for (int c = 0; c < kTile; ++c) {
    dyD[c] = dy[c] * Dm[c];
    dDm[c] += dy[c] * u[c];
  }
}
#endif

// The scan over one chunk: h[N][16] in place; y[t][16] = sum_n h C. With hs/as non-null, also
// stores the state before each step (hs[t], and hs[len] after the last) and the decay factors.
inline void scan_chunk(float* __restrict h, float* __restrict yb, float* __restrict hs, float* __restrict as,
                       const float* __restrict dtb, const float* __restrict dub, const float* __restrict At,
                       const float* __restrict Bp, const float* __restrict Cp, const int32_t* mod, int64_t N,
                       int64_t len) {
  for (int64_t t = 0; t < len; ++t) {
    const float* Am = At + (mod != nullptr ? mod[t] : 0) * N * kTile;
    if (hs != nullptr) std::memcpy(hs + t * N * kTile, h, sizeof(float) * N * kTile);
    scan_step(h, yb + t * kTile, as != nullptr ? as + t * N * kTile : nullptr, dtb + t * kTile, dub + t * kTile, Am,
              Bp + t * N, Cp + t * N, N);
  }
  if (hs != nullptr) std::memcpy(hs + len * N * kTile, h, sizeof(float) * N * kTile);
}

// Forward of one tile: channels d0 .. d0 + nc - 1 of batch b, all in group g.
template <typename T>
void fwd_tile(const ScanArgs<T>& a, const FwdOut<T>& o, int64_t b, int64_t g, int64_t d0, int nc, float* ws) {
  const int64_t N = a.N, L = a.L, M = a.M, dim = a.dim;
  const int64_t n_chunks = momoe::scan::num_chunks(L);
  float* At = ws;
  float* Dt = At + M * N * kTile;
  float* dbt = Dt + M * kTile;
  float* h = dbt + M * kTile;
  float* dtb = h + N * kTile;
  float* dub = dtb + kChunk * kTile;
  float* yb = dub + kChunk * kTile;
  float* ub = yb + kChunk * kTile;
  float* zb = ub + kChunk * kTile;
  load_tables(a.A, a.D, a.delta_bias, dim, N, M, d0, nc, At, Dt, dbt);
  for (int c = 0; c < kTile; ++c)
    for (int64_t n = 0; n < N; ++n)
      h[n * kTile + c] = (a.initial_state != nullptr && c < nc) ? a.initial_state[((b * dim) + d0 + c) * N + n] : 0.0f;
  const float* Bg = a.B + (b * a.G + g) * N * L;
  const float* Cg = a.C + (b * a.G + g) * N * L;
  for (int64_t ci = 0; ci < n_chunks; ++ci) {
    const int64_t t0 = ci * kChunk;
    const int64_t len = L - t0 < kChunk ? L - t0 : kChunk;
    const int32_t* mod = a.modality != nullptr ? a.modality + b * L + t0 : nullptr;
    for (int c = 0; c < nc; ++c)
      for (int64_t n = 0; n < N; ++n) o.chunk_states[(((b * dim) + d0 + c) * n_chunks + ci) * N + n] = h[n * kTile + c];
    load_tile(dtb, a.delta + offset_of(a.ldelta, b, d0, t0), a.ldelta.c, a.ldelta.t, nc, len);
    load_tile(ub, a.u + offset_of(a.lu, b, d0, t0), a.lu.c, a.lu.t, nc, len);
    std::memcpy(dub, ub, sizeof(float) * len * kTile);
    prepare_dt(dtb, dub, nullptr, dbt, mod, len, a.softplus);
    scan_chunk(h, yb, nullptr, nullptr, dtb, dub, At, Bg + t0 * N, Cg + t0 * N, mod, N, len);
    // Epilogue in the (time, channel) tile layout: D skip and SiLU(z) gate.
    if (a.z != nullptr) load_tile(zb, a.z + offset_of(a.lz, b, d0, t0), a.lz.c, a.lz.t, nc, len);
    for (int64_t t = 0; t < len; ++t) {
      const float* Dm = Dt + (mod != nullptr ? mod[t] : 0) * kTile;
      gate_step(yb + t * kTile, Dm, ub + t * kTile, a.z != nullptr ? zb + t * kTile : nullptr);
    }
    store_tile(o.out + offset_of(o.lout, b, d0, t0), yb, o.lout.c, o.lout.t, nc, len);
  }
  for (int c = 0; c < nc; ++c)
    for (int64_t n = 0; n < N; ++n) o.last_state[((b * dim) + d0 + c) * N + n] = h[n * kTile + c];
}

template <typename T>
void fwd_tasks(const ScanArgs<T>& a, const FwdOut<T>& o, int64_t begin, int64_t end, float* ws) {
  const int64_t dpg = a.dim / a.G;
  const int64_t tpg = momoe::scan::tiles_per_group(a.dim, a.G);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / (a.G * tpg);
    const int64_t g = (task / tpg) % a.G;
    const int64_t tile = task % tpg;
    const int64_t c0 = tile * kTile;
    const int nc = static_cast<int>(dpg - c0 < kTile ? dpg - c0 : kTile);
    fwd_tile(a, o, b, g, g * dpg + c0, nc, ws);
  }
}

// One state row of the reverse step (16 channels): g = dh + dy * C; dA += g a h_prev dt;
// ddt += g a h_prev A; dbu += g B; PB = g * dt * u (for dB), PC = dy * h (for dC); dh = g * a.
inline void bwd_state_step(float* __restrict dh, float* __restrict dA, float* __restrict ddt, float* __restrict dbu,
                           float* __restrict pb, float* __restrict pc, const float* __restrict dy,
                           const float* __restrict hp, const float* __restrict hc, const float* __restrict an,
                           const float* __restrict An, const float* __restrict dt, const float* __restrict du, float bn,
                           float cn) {
  for (int c = 0; c < kTile; ++c) {
    const float g = dh[c] + dy[c] * cn;
    const float q = g * an[c] * hp[c];
    dA[c] += q * dt[c];
    ddt[c] += q * An[c];
    dbu[c] += g * bn;
    pb[c] = g * du[c];
    pc[c] = dy[c] * hc[c];
    dh[c] = g * an[c];
  }
}

// Backward of one tile; dBp / dCp: this block's (L, N) partial sums.
template <typename T>
void bwd_tile(const ScanArgs<T>& a, const BwdOut<T>& o, int64_t b, int64_t g, int64_t d0, int nc, float* dBp,
              float* dCp, float* ws) {
  const int64_t N = a.N, L = a.L, M = a.M, dim = a.dim;
  const int64_t n_chunks = momoe::scan::num_chunks(L);
  float* At = ws;
  float* Dt = At + M * N * kTile;
  float* dbt = Dt + M * kTile;
  float* dAt = dbt + M * kTile;
  float* dDt = dAt + M * N * kTile;
  float* ddbt = dDt + M * kTile;
  float* dh = ddbt + M * kTile;
  float* hrun = dh + N * kTile;
  float* hs = hrun + N * kTile;                // (kChunk + 1) x N x 16
  float* as = hs + (kChunk + 1) * N * kTile;   // kChunk x N x 16
  float* dtb = as + kChunk * N * kTile;
  float* dub = dtb + kChunk * kTile;
  float* ub = dub + kChunk * kTile;
  float* sgb = ub + kChunk * kTile;
  float* yb = sgb + kChunk * kTile;
  float* dyb = yb + kChunk * kTile;
  float* dyDb = dyb + kChunk * kTile;
  float* ddtb = dyDb + kChunk * kTile;
  float* dutb = ddtb + kChunk * kTile;
  float* PB = dutb + kChunk * kTile;  // 16 x 16
  float* PC = PB + kTile * kTile;     // 16 x 16
  load_tables(a.A, a.D, a.delta_bias, dim, N, M, d0, nc, At, Dt, dbt);
  std::memset(dAt, 0, sizeof(float) * M * N * kTile);
  std::memset(dDt, 0, sizeof(float) * M * kTile);
  std::memset(ddbt, 0, sizeof(float) * M * kTile);
  for (int c = 0; c < kTile; ++c)
    for (int64_t n = 0; n < N; ++n)
      dh[n * kTile + c] = (o.dlast_state != nullptr && c < nc) ? o.dlast_state[((b * dim) + d0 + c) * N + n] : 0.0f;
  const float* Bg = a.B + (b * a.G + g) * N * L;
  const float* Cg = a.C + (b * a.G + g) * N * L;
  for (int64_t ci = n_chunks - 1; ci >= 0; --ci) {
    const int64_t t0 = ci * kChunk;
    const int64_t len = L - t0 < kChunk ? L - t0 : kChunk;
    const int32_t* mod = a.modality != nullptr ? a.modality + b * L + t0 : nullptr;
    // Recompute the chunk's states and decay factors from its saved start state.
    for (int c = 0; c < kTile; ++c)
      for (int64_t n = 0; n < N; ++n)
        hrun[n * kTile + c] = c < nc ? o.chunk_states[(((b * dim) + d0 + c) * n_chunks + ci) * N + n] : 0.0f;
    load_tile(dtb, a.delta + offset_of(a.ldelta, b, d0, t0), a.ldelta.c, a.ldelta.t, nc, len);
    load_tile(ub, a.u + offset_of(a.lu, b, d0, t0), a.lu.c, a.lu.t, nc, len);
    std::memcpy(dub, ub, sizeof(float) * len * kTile);
    prepare_dt(dtb, dub, sgb, dbt, mod, len, a.softplus);
    scan_chunk(hrun, yb, hs, as, dtb, dub, At, Bg + t0 * N, Cg + t0 * N, mod, N, len);
    // Gate and D skip in the tile layout: dy = dout * silu(z), dz, dD; dyDb = dy * D. ddtb and dutb
    // hold dout and z here (they are outputs of the reverse scan below); dz overwrites yb.
    float* dob = ddtb;
    float* zb = dutb;
    load_tile(dob, o.dout + offset_of(o.ldout, b, d0, t0), o.ldout.c, o.ldout.t, nc, len);
    if (a.z != nullptr) load_tile(zb, a.z + offset_of(a.lz, b, d0, t0), a.lz.c, a.lz.t, nc, len);
    for (int64_t t = 0; t < len; ++t) {
      const int64_t m = mod != nullptr ? mod[t] : 0;
      gate_bwd_step(yb + t * kTile, dyb + t * kTile, dyDb + t * kTile, dDt + m * kTile, dob + t * kTile,
                    a.z != nullptr ? zb + t * kTile : nullptr, ub + t * kTile, Dt + m * kTile);
    }
    if (o.dz != nullptr) store_tile(o.dz + offset_of(o.ldz, b, d0, t0), yb, o.ldz.c, o.ldz.t, nc, len);
    // Reverse scan over the chunk.
    for (int64_t t = len - 1; t >= 0; --t) {
      const int64_t m = mod != nullptr ? mod[t] : 0;
      const float* __restrict Am = At + m * N * kTile;
      float* __restrict dAm = dAt + m * N * kTile;
      const float* __restrict dt = dtb + t * kTile;
      const float* __restrict du = dub + t * kTile;
      const float* __restrict dy = dyb + t * kTile;
      const float* __restrict hprev = hs + t * N * kTile;
      const float* __restrict hcur = hs + (t + 1) * N * kTile;
      const float* __restrict at = as + t * N * kTile;
      float ddt[kTile], dbu[kTile];
      for (int c = 0; c < kTile; ++c) ddt[c] = dbu[c] = 0.0f;
      for (int64_t n0 = 0; n0 < N; n0 += kTile) {
        const int64_t nn = N - n0 < kTile ? N - n0 : kTile;
        for (int64_t j = 0; j < nn; ++j) {
          const int64_t n = n0 + j;
          const float bn = Bg[(t0 + t) * N + n];
          const float cn = Cg[(t0 + t) * N + n];
          bwd_state_step(dh + n * kTile, dAm + n * kTile, ddt, dbu, PB + j * kTile, PC + j * kTile, dy,
                         hprev + n * kTile, hcur + n * kTile, at + n * kTile, Am + n * kTile, dt, du, bn, cn);
        }
        for (int64_t j = nn; j < kTile; ++j)
          for (int c = 0; c < kTile; ++c) PB[j * kTile + c] = PC[j * kTile + c] = 0.0f;
        float sB[kTile], sC[kTile];
        row_sums_16x16(PB, sB);
        row_sums_16x16(PC, sC);
        for (int64_t j = 0; j < nn; ++j) {
          dBp[(t0 + t) * N + n0 + j] += sB[j];
          dCp[(t0 + t) * N + n0 + j] += sC[j];
        }
      }
      const float* __restrict uv = ub + t * kTile;
      const float* __restrict sg = sgb + t * kTile;
      const float* __restrict dyD = dyDb + t * kTile;
      float* __restrict ddb = ddbt + m * kTile;
      float* __restrict ddo = ddtb + t * kTile;
      float* __restrict duo = dutb + t * kTile;
      for (int c = 0; c < kTile; ++c) {
        const float gd = (ddt[c] + dbu[c] * uv[c]) * sg[c];
        ddo[c] = gd;
        ddb[c] += gd;
        duo[c] = dbu[c] * dt[c] + dyD[c];
      }
    }
    store_tile(o.ddelta + offset_of(o.lddelta, b, d0, t0), ddtb, o.lddelta.c, o.lddelta.t, nc, len);
    store_tile(o.du + offset_of(o.ldu, b, d0, t0), dutb, o.ldu.c, o.ldu.t, nc, len);
  }
  for (int c = 0; c < nc; ++c) {
    const int64_t d = d0 + c;
    if (o.dinitial_state != nullptr)
      for (int64_t n = 0; n < N; ++n) o.dinitial_state[(b * dim + d) * N + n] = dh[n * kTile + c];
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t n = 0; n < N; ++n) o.dA_part[((b * M + m) * dim + d) * N + n] = dAt[(m * N + n) * kTile + c];
      if (o.dD_part != nullptr) o.dD_part[(b * M + m) * dim + d] = dDt[m * kTile + c];
      if (o.ddelta_bias_part != nullptr) o.ddelta_bias_part[(b * M + m) * dim + d] = ddbt[m * kTile + c];
    }
  }
}

template <typename T>
void bwd_tasks(const ScanArgs<T>& a, const BwdOut<T>& o, int64_t begin, int64_t end, float* ws) {
  const int64_t dpg = a.dim / a.G;
  const int64_t tpg = momoe::scan::tiles_per_group(a.dim, a.G);
  const int64_t bpg = momoe::scan::blocks_per_group(a.dim, a.G);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / (a.G * bpg);
    const int64_t g = (task / bpg) % a.G;
    const int64_t blk = task % bpg;
    float* dBp = o.dB_part + ((b * a.G + g) * bpg + blk) * a.N * a.L;
    float* dCp = o.dC_part + ((b * a.G + g) * bpg + blk) * a.N * a.L;
    for (int64_t tile = blk * kBlockTiles; tile < tpg && tile < (blk + 1) * kBlockTiles; ++tile) {
      const int64_t c0 = tile * kTile;
      const int nc = static_cast<int>(dpg - c0 < kTile ? dpg - c0 : kTile);
      bwd_tile(a, o, b, g, g * dpg + c0, nc, dBp, dCp, ws);
    }
  }
}

// Decode step for rows (b, d) in [begin, end) of batch * dim.
template <typename T, typename S>
void step_rows(const StepArgs<T, S>& a, int64_t begin, int64_t end) {
  const int64_t N = a.N, dim = a.dim;
  const int64_t dpg = dim / a.G;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t b = row / dim, d = row % dim;
    const int64_t g = d / dpg;
    const int64_t m = a.modality != nullptr ? a.modality[b] : 0;
    float dt = static_cast<float>(a.dt[row]) + (a.dt_bias != nullptr ? a.dt_bias[m * dim + d] : 0.0f);
    if (a.softplus) dt = simd::softplus(dt);
    const float x = static_cast<float>(a.x[row]);
    const float dtx = dt * x;
    const float* __restrict An = a.A + (m * dim + d) * N;
    const float* __restrict Bn = a.B + (b * a.G + g) * N;
    const float* __restrict Cn = a.C + (b * a.G + g) * N;
    S* __restrict st = a.state + row * N;
    float y = 0.0f;
    for (int64_t n = 0; n < N; ++n) {
      const float hv = simd::exp(dt * An[n]) * static_cast<float>(st[n]) + dtx * Bn[n];
      st[n] = S(hv);
      y += hv * Cn[n];
    }
    if (a.D != nullptr) y += a.D[m * dim + d] * x;
    if (a.z != nullptr) y *= simd::silu(static_cast<float>(a.z[row]));
    a.y[row] = T(y);
  }
}

}  // namespace scan
}  // namespace MOMOE_ISA_NS
}  // namespace momoe
