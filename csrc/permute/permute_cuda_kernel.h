// Torch-free launcher interface of the CUDA permutation kernels, used by permute_cuda.cpp.
//
//   stable_sort            order of positions sorted by id (ties in position order) and the CSR offsets:
//                          a counting sort (per-block histograms, cub exclusive scan, stable scatter) for
//                          up to kMaxCountingSortGroups groups, cub's stable LSD radix sort beyond
//   gather_rows            out[r] = x[index[r]]: a row copy, 16 bytes per access when aligned
//   scatter_rows_csr       out[i] = sum over the CSR rows of i of w[r] * y[r], fp32, ascending r
//   scatter_rows_backward  grad_y[r] = w[r] * g[index[r]], grad_w[r] = <g[index[r]], y[r]> (fp32)
//
// Every result is deterministic: no floating-point atomics, each sum in a fixed order. Ids are checked
// on the device (common/cuda_device.cuh): an id out of range fails a device-side assertion whose message
// names the op and the argument, without a host synchronisation.
// All functions enqueue on `stream` and return the launch error (cudaSuccess when all went well).
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace momoe {
namespace permute_cuda {

enum class IdType { kUInt8, kInt8, kInt16, kInt32, kInt64 };
enum class FloatType { kFloat32, kBFloat16, kFloat16 };
// Per-row weights of scatter_rows: none (all ones), the rows' dtype, or float32.
enum class WeightType { kNone, kSame, kFloat32 };

// Which op an id check belongs to: selects the message of the device-side assertion.
enum class IdCheck {
  kSortByGroup,           // group_ids in [0, num_groups)
  kGatherRows,            // index in [0, rows of x)
  kScatterRows,           // index in [0, num_rows)
  kScatterRowsBackward,   // index in [0, rows of grad_out)
};

constexpr int64_t kMaxCountingSortGroups = 1024;

struct SortArgs {
  const void* ids;  // n ids, contiguous
  IdType id_type;
  int64_t n, num_groups;
  IdCheck check;
  int64_t* order;    // n positions
  int64_t* offsets;  // num_groups + 1: offsets[g] = first slot of group g, offsets[num_groups] = n
  int64_t* sizes;    // num_groups group sizes, or null
};

// Bytes of device workspace stable_sort needs for n ids in num_groups groups.
size_t stable_sort_workspace_bytes(int64_t n, int64_t num_groups);
cudaError_t stable_sort(const SortArgs& args, void* workspace, size_t workspace_bytes, cudaStream_t stream);

struct GatherArgs {
  const void* x;         // rows of row_bytes bytes, x_stride_bytes apart
  int64_t x_rows, x_stride_bytes, row_bytes;
  const void* index;     // R ids, contiguous
  IdType id_type;
  int64_t R;
  IdCheck check;
  void* out;             // (R, row_bytes), contiguous
};

cudaError_t gather_rows(const GatherArgs& args, cudaStream_t stream);

struct ScatterArgs {
  const void* y;         // (R, D) rows, y_stride elements apart
  int64_t y_stride, D;
  FloatType dtype;
  const int64_t* order;    // R rows grouped by destination, ascending within one (stable_sort of index)
  const int64_t* offsets;  // num_rows + 1 CSR offsets into order
  const void* weight;      // R weights (weight_type), or null
  WeightType weight_type;
  int64_t num_rows;
  void* out;             // (num_rows, D), contiguous
};

struct ScatterBackwardArgs {
  const void* grad_out;  // (grad_rows, D), rows g_stride elements apart
  int64_t grad_rows, g_stride;
  const void* y;         // (R, D), rows y_stride elements apart
  int64_t y_stride, D;
  FloatType dtype;
  const void* index;     // R ids, contiguous
  IdType id_type;
  int64_t R;
  const void* weight;    // R weights, kSame or kFloat32 (without weight grad_y is a gather_rows)
  WeightType weight_type;
  void* grad_y;          // (R, D), contiguous
  void* grad_weight;     // R, the weight's dtype
};

// The per-dtype kernels behind scatter_rows_csr / scatter_rows_backward (permute_cuda_{f32,bf16,f16}.cu).
namespace detail {
cudaError_t scatter_rows_csr_f32(const ScatterArgs& args, cudaStream_t stream);
cudaError_t scatter_rows_csr_bf16(const ScatterArgs& args, cudaStream_t stream);
cudaError_t scatter_rows_csr_f16(const ScatterArgs& args, cudaStream_t stream);
cudaError_t scatter_rows_backward_f32(const ScatterBackwardArgs& args, cudaStream_t stream);
cudaError_t scatter_rows_backward_bf16(const ScatterBackwardArgs& args, cudaStream_t stream);
cudaError_t scatter_rows_backward_f16(const ScatterBackwardArgs& args, cudaStream_t stream);
}  // namespace detail

inline cudaError_t scatter_rows_csr(const ScatterArgs& args, cudaStream_t stream) {
  switch (args.dtype) {
    case FloatType::kBFloat16: return detail::scatter_rows_csr_bf16(args, stream);
    case FloatType::kFloat16: return detail::scatter_rows_csr_f16(args, stream);
    default: return detail::scatter_rows_csr_f32(args, stream);
  }
}

inline cudaError_t scatter_rows_backward(const ScatterBackwardArgs& args, cudaStream_t stream) {
  switch (args.dtype) {
    case FloatType::kBFloat16: return detail::scatter_rows_backward_bf16(args, stream);
    case FloatType::kFloat16: return detail::scatter_rows_backward_f16(args, stream);
    default: return detail::scatter_rows_backward_f32(args, stream);
  }
}

}  // namespace permute_cuda
}  // namespace momoe
