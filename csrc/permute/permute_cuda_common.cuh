// Device helpers shared by the permutation kernels (include from .cu files only): id types and their
// checks, element conversions, and the warp-per-row launch shape.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>

#include "common/cuda_device.cuh"
#include "permute/permute_cuda_kernel.h"

namespace momoe {
namespace permute_cuda {

// Calls f(Id{}) with the C++ type of an id dtype.
template <class F>
auto dispatch_id(IdType type, F&& f) {
  switch (type) {
    case IdType::kUInt8: return f(uint8_t{});
    case IdType::kInt8: return f(int8_t{});
    case IdType::kInt16: return f(int16_t{});
    case IdType::kInt32: return f(int32_t{});
    default: return f(int64_t{});
  }
}

namespace {

// Prints the offending id, then fails the device-side assertion of `check` (see IdCheck).
__device__ __noinline__ void fail_id_check(IdCheck check, int64_t position, int64_t value, int64_t limit) {
  printf("momoe: id %lld at position %lld is outside [0, %lld)\n", static_cast<long long>(value),
         static_cast<long long>(position), static_cast<long long>(limit));
  switch (check) {
    case IdCheck::kSortByGroup:
      MOMOE_DEVICE_CHECK(false, "momoe: sort_by_group: group_ids must be in [0, num_groups)");
      break;
    case IdCheck::kGatherRows:
      MOMOE_DEVICE_CHECK(false, "momoe: gather_rows: index must be in [0, rows of x)");
      break;
    case IdCheck::kScatterRows:
      MOMOE_DEVICE_CHECK(false, "momoe: scatter_rows: index must be in [0, num_rows)");
      break;
    default:
      MOMOE_DEVICE_CHECK(false, "momoe: scatter_rows_backward: index must be in [0, rows of grad_out)");
  }
}

}  // namespace

// ids[i] as int64, checked to lie in [0, limit).
template <typename Id>
__device__ __forceinline__ int64_t checked_id(const Id* ids, int64_t i, int64_t limit, IdCheck check) {
  const int64_t value = static_cast<int64_t>(ids[i]);
  if (value < 0 || value >= limit) fail_id_check(check, i, value, limit);
  return value;
}

// fp32 <-> element conversions (round to nearest even, like the CPU kernels).
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// `kVec` consecutive elements moved as one access (16 bytes for the vectorized kernels).
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

// Row kernels run one warp per row, kRowsPerBlock rows per block.
constexpr int kRowsPerBlock = 8;
constexpr int kRowThreads = kRowsPerBlock * cuda::kWarpSize;

// Column vectors each lane handles per pass over a row: independent loads in flight per lane.
constexpr int kVectorsPerLane = 4;

inline unsigned row_blocks(int64_t rows) { return static_cast<unsigned>(cuda::ceil_div(rows, kRowsPerBlock)); }

// The row of this warp, or -1 past the last row.
__device__ __forceinline__ int64_t warp_row(int64_t rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / cuda::kWarpSize;
  return row < rows ? row : -1;
}

}  // namespace permute_cuda
}  // namespace momoe
