// Torch-free launcher interface of the CUDA grouped GEMMs (CUTLASS), used by grouped_gemm_cuda.cpp.
//
// One launch computes every group of a grouped GEMM. The group sizes stay on the device: a one-block
// kernel scans them and writes each group's problem shape, operand pointers and strides into the
// workspace (no host synchronisation), then one CUTLASS grouped kernel runs every group.
//
// Kernels (all fp32 accumulation; D = alpha * A @ B with alpha = 1, the output is never read):
//   sm80  CUTLASS 2.x GemmGrouped, mma.sync tensor cores: bf16 and fp16; fp32 through 3xTF32 (each fp32
//         operand split into a TF32 big and small part, three TF32 products: fp32 accuracy at tensor-core
//         speed). Runs on every GPU of compute capability 8.x and 9.x.
//   sm90  CUTLASS 3.x GemmUniversal with GroupProblemShape: TMA loads, warp-specialized cooperative
//         wgmma kernel (sm_90a only) for bf16 and fp16. Compiled only when the build targets 9.0a.
// Every matrix must be dense (packed rows), 16-byte aligned, with a row length that is a multiple of
// 16 bytes (K and N multiples of 8 elements for 16-bit types, of 4 for fp32); the torch glue pads
// other shapes with zeros.
//
// Shape legend: T rows (tokens), G groups, K and N the matrix sizes of each product below.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace momoe {
namespace cutlass_gemm {

enum class Dtype { kFloat32, kBFloat16, kFloat16 };

// What each group g, made of rows [begin_g, begin_g + m_g) with m_g = group_sizes[g], computes.
enum class Product {
  kXW,   // y[rows of g] (m_g, N) = x[rows of g] (m_g, K) @ w[g] (K, N);   x (T, K), w (G, K, N), y (T, N)
  kXWt,  // y[rows of g] (m_g, N) = x[rows of g] (m_g, K) @ w[g]^T;        w (G, N, K)
  kAtB,  // d[g] (K, N) = a[rows of g]^T (K, m_g) @ b[rows of g] (m_g, N); a (T, K), b (T, N), d (G, K, N);
         // zero for an empty group
};

struct Problem {
  Product product;
  Dtype dtype;
  const void* a;               // x for kXW / kXWt, a for kAtB
  const void* b;               // w for kXW / kXWt, b for kAtB
  void* d;                     // y for kXW / kXWt, d for kAtB
  const int64_t* group_sizes;  // on the device, G entries; each >= 0 and summing to T, else a device-side
                               // assertion fails (see common/cuda_device.cuh)
  int64_t T, G, K, N;          // all below 2^31
  int device;                  // CUDA device of every pointer
  int sm_count;                // its number of SMs
};

// One kernel family for one dtype. `workspace_bytes` is the device workspace `run` needs; `run` enqueues
// the work on `stream` and returns nullptr, or a message saying what failed. `run` is null for a kernel
// that was not compiled (the sm90 kernels when the build does not target 9.0a).
struct Launcher {
  size_t (*workspace_bytes)(const Problem& problem);
  const char* (*run)(const Problem& problem, void* workspace, cudaStream_t stream);
};

// Defined in grouped_gemm_sm80_{fp32,bf16,fp16}.cu and grouped_gemm_sm90_{bf16,fp16}.cu.
extern const Launcher kSm80Float32, kSm80BFloat16, kSm80Float16;
extern const Launcher kSm90BFloat16, kSm90Float16;

// Elements per 16 bytes: the alignment every row length and base pointer needs, in elements.
inline int64_t alignment_elements(Dtype dtype) { return dtype == Dtype::kFloat32 ? 4 : 8; }

// The kernel for `dtype` on a GPU of compute capability `cc_major`.x: the sm90 kernel on Hopper when it
// was compiled and the dtype has one, else the sm80 kernel.
inline const Launcher& select_launcher(Dtype dtype, int cc_major) {
  if (cc_major == 9) {
    if (dtype == Dtype::kBFloat16 && kSm90BFloat16.run != nullptr) return kSm90BFloat16;
    if (dtype == Dtype::kFloat16 && kSm90Float16.run != nullptr) return kSm90Float16;
  }
  switch (dtype) {
    case Dtype::kBFloat16: return kSm80BFloat16;
    case Dtype::kFloat16: return kSm80Float16;
    default: return kSm80Float32;
  }
}

}  // namespace cutlass_gemm
}  // namespace momoe
