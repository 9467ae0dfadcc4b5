// Outputs of a grouped GEMM that the grouped kernel does not write (see grouped_gemm_cuda_problems.cuh).
#include "grouped_gemm/grouped_gemm_cuda_problems.cuh"

namespace momoe {
namespace cutlass_gemm {
namespace {

constexpr int kZeroThreads = 256;
// 16-byte stores per thread and block before the next block of the same group takes over.
constexpr int64_t kZeroVectorsPerThread = 8;

// d[g] = 0 (vectors_per_group 16-byte vectors) for every g with group_sizes[g] == 0. Block b zeroes
// slice b % slices of group b / slices; the blocks of the other groups return at once.
__global__ void __launch_bounds__(kZeroThreads)
    zero_empty_groups(const int64_t* group_sizes, uint4* d, int64_t vectors_per_group, int64_t slices) {
  const int64_t g = blockIdx.x / slices, slice = blockIdx.x % slices;
  if (group_sizes[g] != 0) return;
  uint4* d_g = d + g * vectors_per_group;
  const int64_t stride = slices * kZeroThreads;
  for (int64_t v = slice * kZeroThreads + threadIdx.x; v < vectors_per_group; v += stride) {
    d_g[v] = make_uint4(0u, 0u, 0u, 0u);
  }
}

const char* error_message(cudaError_t error) { return error == cudaSuccess ? nullptr : cudaGetErrorString(error); }

}  // namespace

const char* prepare_outputs(const Problem& problem, cudaStream_t stream, bool* gemm_needed) {
  const int64_t bytes = element_bytes(problem.dtype);
  *gemm_needed = false;
  if (problem.product != Product::kAtB) {
    if (problem.T == 0 || problem.N == 0) return nullptr;  // y is empty
    if (problem.K == 0) return error_message(cudaMemsetAsync(problem.d, 0, problem.T * problem.N * bytes, stream));
    *gemm_needed = true;
    return nullptr;
  }
  const int64_t matrix_bytes = problem.K * problem.N * bytes;
  if (problem.G == 0 || matrix_bytes == 0) return nullptr;  // d is empty
  // Row lengths are multiples of 16 bytes (see grouped_gemm_cuda_kernel.h), so is each d[g].
  const int64_t vectors = matrix_bytes / 16;
  const int64_t slices = cuda::ceil_div(vectors, kZeroThreads * kZeroVectorsPerThread);
  zero_empty_groups<<<static_cast<unsigned>(problem.G * slices), kZeroThreads, 0, stream>>>(
      problem.group_sizes, static_cast<uint4*>(problem.d), vectors, slices);
  if (const char* error = error_message(cudaGetLastError())) return error;
  *gemm_needed = problem.T > 0;
  return nullptr;
}

}  // namespace cutlass_gemm
}  // namespace momoe
