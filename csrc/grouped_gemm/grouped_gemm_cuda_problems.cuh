// Device-side set-up shared by the sm80 and sm90 grouped GEMMs (include from .cu files only): the
// per-group problems built from the group sizes on the device, and the outputs the grouped kernel does
// not write.
#pragma once
#include <cub/block/block_scan.cuh>
#include <cutlass/layout/matrix.h>

#include <cstddef>
#include <cstdint>

#include "common/cuda_device.cuh"
#include "grouped_gemm/grouped_gemm_cuda_kernel.h"

namespace momoe {
namespace cutlass_gemm {

// Group g's GEMM as CUTLASS sees it: D (m x n) = A (m x k) @ B (k x n), with the element offsets of its
// operands from the base pointers and their leading dimensions.
struct GroupGemm {
  int m, n, k;
  int64_t a_offset, b_offset, d_offset;
  int64_t lda, ldb, ldd;
};

// Group g, rows [begin, begin + rows), of `product` (layouts in with_layouts below). An empty group of
// kAtB is an empty problem (0 x 0 x 0) whose output prepare_outputs zeroes.
__device__ inline GroupGemm group_gemm(Product product, int64_t K, int64_t N, int64_t g, int64_t begin, int64_t rows) {
  if (product == Product::kAtB) {
    if (rows == 0) return {0, 0, 0, 0, 0, g * K * N, K, N, N};
    return {int(K), int(N), int(rows), begin * K, begin * N, g * K * N, K, N, N};
  }
  const int64_t ldb = product == Product::kXW ? N : K;
  return {int(rows), int(N), int(K), begin * K, g * K * N, begin * N, K, ldb, N};
}

// Calls f(LayoutA{}, LayoutB{}) with CUTLASS's layouts of the operands of `product` (D is row-major):
//   kXW  A = x rows (row-major), B = w[g] (K, N) (row-major)
//   kXWt A = x rows (row-major), B = w[g]^T, w[g] (N, K) row-major (column-major K x N)
//   kAtB A = a rows^T (column-major K x m), B = b rows (row-major m x N)
template <class F>
auto with_layouts(Product product, F&& f) {
  using Row = cutlass::layout::RowMajor;
  using Col = cutlass::layout::ColumnMajor;
  switch (product) {
    case Product::kXW: return f(Row{}, Row{});
    case Product::kXWt: return f(Row{}, Col{});
    default: return f(Col{}, Row{});
  }
}

constexpr int kBuildThreads = 256;

// One block: scans group_sizes (each checked >= 0, the total checked == T) and calls write(g, GroupGemm)
// for each group. Launched even when there is nothing to multiply, so the sizes are always checked.
template <class Writer>
__global__ void __launch_bounds__(kBuildThreads) build_group_gemms(Problem problem, Writer write) {
  using Scan = cub::BlockScan<int64_t, kBuildThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  int64_t carry = 0;  // rows of the groups before this chunk
  for (int64_t chunk = 0; chunk < problem.G; chunk += kBuildThreads) {
    const int64_t g = chunk + threadIdx.x;
    const int64_t rows = g < problem.G ? problem.group_sizes[g] : 0;
    MOMOE_DEVICE_CHECK(rows >= 0, "momoe: grouped_gemm: group_sizes must be >= 0");
    int64_t begin, chunk_rows;
    Scan(scan_storage).ExclusiveSum(rows, begin, chunk_rows);
    begin += carry;
    MOMOE_DEVICE_CHECK(begin + rows <= problem.T,
                       "momoe: grouped_gemm: group_sizes must sum to the number of rows of x (T)");
    if (g < problem.G) write(g, group_gemm(problem.product, problem.K, problem.N, g, begin, rows));
    carry += chunk_rows;
    __syncthreads();  // before scan_storage is reused
  }
  if (threadIdx.x == 0) {
    MOMOE_DEVICE_CHECK(carry == problem.T, "momoe: grouped_gemm: group_sizes must sum to the number of rows of x (T)");
  }
}

inline int64_t element_bytes(Dtype dtype) { return dtype == Dtype::kFloat32 ? 4 : 2; }

// The message of a failed host-side step: the pending CUDA error when there is one (it explains the
// failure, e.g. a device-side assertion of the kernel that checked the group sizes), else `what`.
inline const char* failure(const char* what) {
  const cudaError_t error = cudaGetLastError();
  return error != cudaSuccess ? cudaGetErrorString(error) : what;
}

// Writes what the grouped kernel will not: zeros of every output when K == 0 (kXW, kXWt), zeros of the
// empty groups' d[g] (kAtB). Sets *gemm_needed to whether the grouped kernel has any tile to compute.
// Returns nullptr or the CUDA error's message. (grouped_gemm_cuda_problems.cu)
const char* prepare_outputs(const Problem& problem, cudaStream_t stream, bool* gemm_needed);

// Carves the per-group arrays of `Family` out of `workspace` (cuda::Carver), builds them and, when there
// is work, runs the grouped kernel of `Family` (sm80 / sm90) for the layouts of problem.product.
//   Family::Arrays<A, B>  per-group arrays; Arrays(cuda::Carver&, G) carves them
//   Family::Writer<A, B>  Writer(arrays, problem): __device__ operator()(g, GroupGemm) fills them
//   Family::gemm<A, B>(problem, arrays, workspace, stream) / gemm_workspace_bytes<A, B>(problem)
template <class Family>
size_t workspace_bytes(const Problem& problem) {
  return with_layouts(problem.product, [&](auto a, auto b) {
    using A = decltype(a);
    using B = decltype(b);
    cuda::Carver carver(nullptr);
    typename Family::template Arrays<A, B> arrays(carver, problem.G);
    return carver.used() + Family::template gemm_workspace_bytes<A, B>(problem);
  });
}

template <class Family>
const char* run(const Problem& problem, void* workspace, cudaStream_t stream) {
  return with_layouts(problem.product, [&](auto a, auto b) -> const char* {
    using A = decltype(a);
    using B = decltype(b);
    cuda::Carver carver(workspace);
    typename Family::template Arrays<A, B> arrays(carver, problem.G);
    const typename Family::template Writer<A, B> writer(arrays, problem);
    build_group_gemms<<<1, kBuildThreads, 0, stream>>>(problem, writer);
    if (const char* error = failure(nullptr)) return error;
    bool gemm_needed = false;
    if (const char* error = prepare_outputs(problem, stream, &gemm_needed)) return error;
    if (!gemm_needed) return nullptr;
    return Family::template gemm<A, B>(problem, arrays, carver.rest(), stream);
  });
}

}  // namespace cutlass_gemm
}  // namespace momoe
