// The typed row kernels of the permutation ops (include from permute_cuda_{f32,bf16,f16}.cu): the
// weighted combine of scatter_rows and its backward. One warp per row; kVec elements per access (16
// bytes when the rows, strides and pointers allow it, else one element); fp32 arithmetic throughout.
#pragma once
#include <initializer_list>

#include "permute/permute_cuda_common.cuh"

namespace momoe {
namespace permute_cuda {

// out[i] = sum over j in [offsets[i], offsets[i + 1]) of w[order[j]] * y[order[j]], summed in that order
// (ascending rows) in fp32 by one warp, so the result does not depend on the launch; zero when empty.
template <typename T, typename W, int kVec>
__global__ void __launch_bounds__(kRowThreads) scatter_rows_csr_kernel(ScatterArgs args) {
  const int64_t i = warp_row(args.num_rows);
  if (i < 0) return;
  using P = Pack<T, kVec>;
  const int lane = threadIdx.x % cuda::kWarpSize;
  const T* y = static_cast<const T*>(args.y);
  const W* weight = static_cast<const W*>(args.weight);
  P* out = reinterpret_cast<P*>(static_cast<T*>(args.out) + i * args.D);
  const int64_t begin = args.offsets[i], end = args.offsets[i + 1];
  const int64_t vectors = args.D / kVec;
  for (int64_t first = lane; first < vectors; first += cuda::kWarpSize * kVectorsPerLane) {
    float acc[kVectorsPerLane][kVec] = {};
    for (int64_t j = begin; j < end; ++j) {
      const int64_t r = args.order[j];
      const float w = weight != nullptr ? to_float(weight[r]) : 1.0f;
      const P* row = reinterpret_cast<const P*>(y + r * args.y_stride);
#pragma unroll
      for (int u = 0; u < kVectorsPerLane; ++u) {
        const int64_t v = first + u * cuda::kWarpSize;
        if (v < vectors) {
          const P p = row[v];
#pragma unroll
          for (int e = 0; e < kVec; ++e) acc[u][e] = fmaf(w, to_float(p.v[e]), acc[u][e]);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kVectorsPerLane; ++u) {
      const int64_t v = first + u * cuda::kWarpSize;
      if (v < vectors) {
        P p;
#pragma unroll
        for (int e = 0; e < kVec; ++e) p.v[e] = from_float<T>(acc[u][e]);
        out[v] = p;
      }
    }
  }
}

// grad_y[r] = w[r] * grad_out[index[r]], grad_w[r] = <grad_out[index[r]], y[r]>: each lane sums its
// columns in order, then a butterfly over the warp (a fixed order) adds the lanes' sums.
template <typename T, typename W, typename Id, int kVec>
__global__ void __launch_bounds__(kRowThreads) scatter_rows_backward_kernel(ScatterBackwardArgs args) {
  const int64_t r = warp_row(args.R);
  if (r < 0) return;
  using P = Pack<T, kVec>;
  const int lane = threadIdx.x % cuda::kWarpSize;
  const int64_t src =
      checked_id(static_cast<const Id*>(args.index), r, args.grad_rows, IdCheck::kScatterRowsBackward);
  const P* g = reinterpret_cast<const P*>(static_cast<const T*>(args.grad_out) + src * args.g_stride);
  const P* y = reinterpret_cast<const P*>(static_cast<const T*>(args.y) + r * args.y_stride);
  P* grad_y = reinterpret_cast<P*>(static_cast<T*>(args.grad_y) + r * args.D);
  const float w = to_float(static_cast<const W*>(args.weight)[r]);
  const int64_t vectors = args.D / kVec;
  float dot = 0.0f;
  for (int64_t first = lane; first < vectors; first += cuda::kWarpSize * kVectorsPerLane) {
    P g_pack[kVectorsPerLane], y_pack[kVectorsPerLane];
#pragma unroll
    for (int u = 0; u < kVectorsPerLane; ++u) {
      const int64_t v = first + u * cuda::kWarpSize;
      if (v < vectors) {
        g_pack[u] = g[v];
        y_pack[u] = y[v];
      }
    }
#pragma unroll
    for (int u = 0; u < kVectorsPerLane; ++u) {
      const int64_t v = first + u * cuda::kWarpSize;
      if (v < vectors) {
        P out;
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const float ge = to_float(g_pack[u].v[e]);
          out.v[e] = from_float<T>(w * ge);
          dot = fmaf(ge, to_float(y_pack[u].v[e]), dot);
        }
        grad_y[v] = out;
      }
    }
  }
#pragma unroll
  for (int offset = cuda::kWarpSize / 2; offset > 0; offset /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
  if (lane == 0) static_cast<W*>(args.grad_weight)[r] = from_float<W>(dot);
}

// Elements per 16 bytes when the rows allow 16-byte accesses, else 1.
template <typename T>
bool rows_fit_vectors(int64_t D, std::initializer_list<const void*> pointers, std::initializer_list<int64_t> strides) {
  constexpr int64_t kBytes = 16;
  if (D * static_cast<int64_t>(sizeof(T)) % kBytes != 0) return false;
  for (const void* p : pointers) {
    if (!cuda::is_aligned(p, kBytes)) return false;
  }
  for (int64_t stride : strides) {
    if (stride * static_cast<int64_t>(sizeof(T)) % kBytes != 0) return false;
  }
  return true;
}

template <typename T>
cudaError_t launch_scatter_rows_csr(const ScatterArgs& args, cudaStream_t stream) {
  if (args.num_rows == 0 || args.D == 0) return cudaSuccess;
  constexpr int kVec = 16 / sizeof(T);
  const bool vectorized = rows_fit_vectors<T>(args.D, {args.y, args.out}, {args.y_stride});
  const unsigned blocks = row_blocks(args.num_rows);
  const bool fp32_weight = args.weight_type == WeightType::kFloat32;
  if (vectorized && fp32_weight) {
    scatter_rows_csr_kernel<T, float, kVec><<<blocks, kRowThreads, 0, stream>>>(args);
  } else if (vectorized) {
    scatter_rows_csr_kernel<T, T, kVec><<<blocks, kRowThreads, 0, stream>>>(args);
  } else if (fp32_weight) {
    scatter_rows_csr_kernel<T, float, 1><<<blocks, kRowThreads, 0, stream>>>(args);
  } else {
    scatter_rows_csr_kernel<T, T, 1><<<blocks, kRowThreads, 0, stream>>>(args);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_scatter_rows_backward(const ScatterBackwardArgs& args, cudaStream_t stream) {
  if (args.R == 0) return cudaSuccess;
  constexpr int kVec = 16 / sizeof(T);
  const bool vectorized =
      rows_fit_vectors<T>(args.D, {args.grad_out, args.y, args.grad_y}, {args.g_stride, args.y_stride});
  const unsigned blocks = row_blocks(args.R);
  const bool fp32_weight = args.weight_type == WeightType::kFloat32;
  dispatch_id(args.id_type, [&](auto tag) {
    using Id = decltype(tag);
    if (vectorized && fp32_weight) {
      scatter_rows_backward_kernel<T, float, Id, kVec><<<blocks, kRowThreads, 0, stream>>>(args);
    } else if (vectorized) {
      scatter_rows_backward_kernel<T, T, Id, kVec><<<blocks, kRowThreads, 0, stream>>>(args);
    } else if (fp32_weight) {
      scatter_rows_backward_kernel<T, float, Id, 1><<<blocks, kRowThreads, 0, stream>>>(args);
    } else {
      scatter_rows_backward_kernel<T, T, Id, 1><<<blocks, kRowThreads, 0, stream>>>(args);
    }
  });
  return cudaGetLastError();
}

}  // namespace permute_cuda
}  // namespace momoe
