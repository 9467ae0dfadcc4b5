// Torch-free host interface of the CUDA selective scan: argument structs, tile configuration and the
// launchers defined in the selective_scan_*.cu files (one file per dtype instantiation).
//
// Layout: u, delta, z, out, dout, du, ddelta, dz: (batch, dim, L) in T (float, __nv_bfloat16 or __half)
// with strides of their own (see Layout); B, C: (batch, G, N, Lp) fp32 contiguous and 16-byte aligned,
// Lp = 256 * ceil(L / 256), zero in [L, Lp); A: (M, dim, N) fp32; D, delta_bias: (M, dim) fp32;
// modality: (batch, L) int32 (M = 1 and modality == nullptr without modality); initial/last state:
// (batch, dim, N) fp32; chunk_states: (batch, dim, ceil(L / 256), N) fp32, the state before step 256 c.
//
// Work split (forward and backward): a thread block owns kChannels channels of one (batch, group) and
// walks the sequence in chunks of kChunk = 256 steps (forward in order, backward in reverse). Inside a
// chunk, each channel's 256 steps are split over the kLanes = 256 / kItems lanes of a warp, kItems
// consecutive steps per lane; for every state n, a lane composes its steps' maps h -> a h + b in
// registers, and a Kogge-Stone scan over the lanes (warp shuffles, the operator
// (a1, b1) then (a2, b2) = (a2 a1, a2 b1 + b2)) gives every lane the state at its first step, the state
// carried from the previous chunk folded into the first lane. A 256-step chunk is one warp per
// channel, so the scan needs no shared memory and no block barrier.
// u, delta, z, dout and the outputs go through shared-memory tiles loaded and stored in whichever
// order is contiguous in memory (channel-major: mamba-ssm's layout; time-major: the transpose of a
// (batch, L, dim) activation), so both layouts are coalesced. The per-modality parameters (A, D,
// delta_bias) are tables in shared memory indexed by each step's modality; a chunk of one modality
// (the common case: modalities come in runs) reads one A row per state instead of one per step.
// Backward: per chunk, in reverse, the forward is recomputed from chunk_states (which also gives the
// pre-gate output needed for dz), then a reverse scan of the same shape gives the state gradient.
// dB/dC (sums over channels) are reduced over the block's channels in shared memory and added to
// fp32 (batch, G, N, L) buffers with one atomic per (block, n, t); dA/dD/ddelta_bias are reduced per
// block in shared memory and written to per-batch partials that the caller sums (no atomics).
// Sizes (registers per thread, compiled for sm_90a): forward 8 channels x 32 lanes (256 threads, 2
// blocks per SM at <= 128 registers), backward 4 channels x 32 lanes (128 threads, 3 blocks per SM at
// <= 168 registers).
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

// Helpers below are also called from device code (nvcc) and from the torch glue (the host compiler).
#if defined(__CUDACC__)
#define MOMOE_HOST_DEVICE __host__ __device__
#else
#define MOMOE_HOST_DEVICE
#endif

namespace momoe {
namespace scan_cuda {

constexpr int kChunk = 256;  // timesteps per saved chunk state, and per block iteration

// Tile shapes: channels per block and consecutive timesteps per lane (kChunk / kItems lanes per channel).
constexpr int kFwdChannels = 8;
constexpr int kFwdItems = 8;
constexpr int kBwdChannels = 4;
constexpr int kBwdItems = 8;

// Element strides of a (batch, dim, L) tensor.
struct Layout {
  int64_t b, c, t;
};

struct ScanArgs {
  int64_t batch, dim, L, N, G, M;
  const void* u;      // T
  const void* delta;  // T
  const void* z;      // T, nullable
  Layout lu, ldelta, lz;
  const float* A;              // (M, dim, N)
  const float* B;              // (batch, G, N, Lp), zero-padded
  const float* C;              // (batch, G, N, Lp), zero-padded
  const float* D;              // (M, dim), nullable
  const float* delta_bias;     // (M, dim), nullable
  const int32_t* modality;     // (batch, L), nullable; ids outside [0, M) are clamped into it
  const float* initial_state;  // (batch, dim, N), nullable
  bool softplus;
};

struct FwdOut {
  void* out;  // T
  Layout lout;
  float* last_state;    // (batch, dim, N)
  float* chunk_states;  // (batch, dim, n_chunks, N)
};

struct BwdOut {
  const void* dout;            // T
  const float* dlast_state;    // (batch, dim, N), nullable
  const float* chunk_states;   // (batch, dim, n_chunks, N)
  void* du;                    // T
  void* ddelta;                // T
  void* dz;                    // T, nullable (when z is)
  Layout ldout, ldu, lddelta, ldz;
  float* dB;                   // (batch, G, N, L) fp32, zero-initialised (atomic sums)
  float* dC;                   // (batch, G, N, L) fp32, zero-initialised (atomic sums)
  float* dA_part;              // (batch, M, dim, N)
  float* dD_part;              // (batch, M, dim), nullable
  float* ddelta_bias_part;     // (batch, M, dim), nullable
  float* dinitial_state;       // (batch, dim, N), nullable
};

enum class DType { kFloat32, kBFloat16, kFloat16 };

// Decode step: one token, state updated in place (contiguous); x, dt, z, B, C read through strides.
struct StepArgs {
  int64_t batch, dim, N, G, M;
  DType dtype;        // of x, dt, z and y
  DType state_dtype;  // float32 or dtype
  DType bc_dtype;     // of B and C: float32 or dtype
  void* state;        // (batch, dim, N)
  const void* x;      // (batch, dim)
  const void* dt;     // (batch, dim)
  const void* z;      // (batch, dim), nullable
  int64_t sx_b, sx_d, sdt_b, sdt_d, sz_b, sz_d;
  const void* B;      // (batch, G, N)
  const void* C;      // (batch, G, N)
  int64_t sB_b, sB_g, sB_n, sC_b, sC_g, sC_n;
  const float* A;         // (M, dim, N)
  const float* D;         // (M, dim), nullable
  const float* dt_bias;   // (M, dim), nullable
  const int32_t* modality;  // (batch,), nullable; clamped into [0, M)
  bool softplus;
  void* y;  // (batch, dim) contiguous, dtype
};

MOMOE_HOST_DEVICE inline int64_t num_chunks(int64_t L) { return (L + kChunk - 1) / kChunk; }

// Shared memory of a block: the kChannels x kChunk fp32 tiles (rows padded so that lanes reading
// their kItems steps with 16-byte loads hit distinct banks), the modality tables and carries.
MOMOE_HOST_DEVICE inline constexpr int64_t tile_row_floats(int items) { return (kChunk / items) * (items + 4) + 4; }
inline size_t fwd_smem_bytes(int64_t N, int64_t M) {
  const int64_t floats = 2 * kFwdChannels * tile_row_floats(kFwdItems)  // two staging tiles
                         + M * (kFwdChannels * N + 1)                     // A * log2(e)
                         + 2 * M * kFwdChannels                           // D, delta_bias
                         + kFwdChannels * N                               // carried state
                         + kChunk;                                        // modality ids
  return static_cast<size_t>(floats) * 4;
}
constexpr int kBwdBcRows = 16;  // state rows n whose dB/dC sums a backward block collects before flushing
inline size_t bwd_smem_bytes(int64_t N, int64_t M) {
  const int64_t floats = 3 * kBwdChannels * tile_row_floats(kBwdItems)  // three staging tiles
                         + 2 * M * (kBwdChannels * N + 1)                 // A * log2(e), dA
                         + 4 * M * kBwdChannels                           // D, delta_bias, dD, ddelta_bias
                         + kBwdChannels * N                               // carried state gradient
                         + 2 * kBwdBcRows * kChunk                        // dB, dC of kBwdBcRows rows
                         + kChunk;                                        // modality ids
  return static_cast<size_t>(floats) * 4;
}

// Launchers: each returns the launch's error (cudaSuccess when nothing was launched).
cudaError_t selective_scan_fwd_fp32(const ScanArgs& a, const FwdOut& o, cudaStream_t stream);
cudaError_t selective_scan_fwd_bf16(const ScanArgs& a, const FwdOut& o, cudaStream_t stream);
cudaError_t selective_scan_fwd_fp16(const ScanArgs& a, const FwdOut& o, cudaStream_t stream);
cudaError_t selective_scan_bwd_fp32(const ScanArgs& a, const BwdOut& o, cudaStream_t stream);
cudaError_t selective_scan_bwd_bf16(const ScanArgs& a, const BwdOut& o, cudaStream_t stream);
cudaError_t selective_scan_bwd_fp16(const ScanArgs& a, const BwdOut& o, cudaStream_t stream);
cudaError_t selective_state_update(const StepArgs& a, cudaStream_t stream);

}  // namespace scan_cuda
}  // namespace momoe
