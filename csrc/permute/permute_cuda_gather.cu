// gather_rows on the GPU: out[r] = x[index[r]], a byte copy of each row (the dtype does not matter).
// One warp per row; each access moves the widest unit (16, 8, 4 or 2 bytes) that the row length, the
// row stride and both base pointers are multiples of, with kVectorsPerLane loads in flight per lane.
#include "permute/permute_cuda_common.cuh"

namespace momoe {
namespace permute_cuda {
namespace {

template <typename Vec, typename Id>
__global__ void __launch_bounds__(kRowThreads) gather_rows_kernel(GatherArgs args) {
  const int64_t r = warp_row(args.R);
  if (r < 0) return;
  const int lane = threadIdx.x % cuda::kWarpSize;
  const int64_t src = checked_id(static_cast<const Id*>(args.index), r, args.x_rows, args.check);
  const Vec* from = reinterpret_cast<const Vec*>(static_cast<const char*>(args.x) + src * args.x_stride_bytes);
  Vec* to = reinterpret_cast<Vec*>(static_cast<char*>(args.out) + r * args.row_bytes);
  const int64_t vectors = args.row_bytes / static_cast<int64_t>(sizeof(Vec));
  for (int64_t first = lane; first < vectors; first += cuda::kWarpSize * kVectorsPerLane) {
    Vec buffer[kVectorsPerLane];
#pragma unroll
    for (int u = 0; u < kVectorsPerLane; ++u) {
      const int64_t v = first + u * cuda::kWarpSize;
      if (v < vectors) buffer[u] = from[v];
    }
#pragma unroll
    for (int u = 0; u < kVectorsPerLane; ++u) {
      const int64_t v = first + u * cuda::kWarpSize;
      if (v < vectors) to[v] = buffer[u];
    }
  }
}

template <typename Vec>
cudaError_t launch(const GatherArgs& args, cudaStream_t stream) {
  dispatch_id(args.id_type, [&](auto tag) {
    gather_rows_kernel<Vec, decltype(tag)><<<row_blocks(args.R), kRowThreads, 0, stream>>>(args);
  });
  return cudaGetLastError();
}

// Whether every row can be moved in units of `bytes`.
bool fits(const GatherArgs& args, int64_t bytes) {
  return cuda::is_aligned(args.x, bytes) && cuda::is_aligned(args.out, bytes) && args.x_stride_bytes % bytes == 0 &&
         args.row_bytes % bytes == 0;
}

}  // namespace

cudaError_t gather_rows(const GatherArgs& args, cudaStream_t stream) {
  if (args.R == 0) return cudaSuccess;
  // Zero-byte rows still have their ids checked, a row at a time.
  if (fits(args, 16)) return launch<uint4>(args, stream);
  if (fits(args, 8)) return launch<uint2>(args, stream);
  if (fits(args, 4)) return launch<uint32_t>(args, stream);
  return launch<uint16_t>(args, stream);
}

}  // namespace permute_cuda
}  // namespace momoe
