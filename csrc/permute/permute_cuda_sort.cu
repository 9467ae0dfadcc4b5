// Stable sort of ids by value on the GPU: sort_by_group, and the CSR of scatter_rows (rows grouped by
// their destination). See permute_cuda_kernel.h.
//
// Up to kMaxCountingSortGroups groups, a counting sort in three passes over the ids:
//   1. count_chunks: block c counts the ids of its chunk (kChunk consecutive positions) per group, in
//      shared memory, into counts[g * chunks + c] (group-major);
//   2. cub's exclusive scan of counts: starts[g * chunks + c] is the first slot of chunk c's ids of
//      group g (all of group g's earlier chunks, and all of the smaller groups, come before it);
//   3. scatter_chunks: block c walks its chunk in order, one tile of kSortThreads positions at a time,
//      ranking equal ids inside each warp with __match_any_sync and across the tile's warps with
//      per-warp counts in shared memory, so each position goes to its stable slot.
// More groups would make the per-chunk histograms too large; there cub's stable LSD radix sort (which
// is itself a counting sort per 8-bit digit) sorts (id, position) pairs on the bits that G needs, and a
// binary search per group in the sorted ids gives the offsets.
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include <algorithm>

#include "permute/permute_cuda_common.cuh"

namespace momoe {
namespace permute_cuda {
namespace {

constexpr int kSortThreads = 256;
constexpr int kSortWarps = kSortThreads / cuda::kWarpSize;
constexpr int kSortTiles = 8;
constexpr int64_t kChunk = int64_t{kSortThreads} * kSortTiles;  // positions per block
constexpr int kOffsetThreads = 256;

// ---------------------------------------------------------------------------------------- counting sort

template <typename Id>
__global__ void __launch_bounds__(kSortThreads)
    count_chunks(const Id* ids, int64_t n, int G, IdCheck check, int64_t chunks, int64_t* counts) {
  __shared__ int histogram[kMaxCountingSortGroups];
  for (int g = threadIdx.x; g < G; g += kSortThreads) histogram[g] = 0;
  __syncthreads();
  const int64_t begin = blockIdx.x * kChunk, end = min(n, begin + kChunk);
  for (int64_t i = begin + threadIdx.x; i < end; i += kSortThreads) {
    atomicAdd(&histogram[checked_id(ids, i, G, check)], 1);  // integer counts: order does not matter
  }
  __syncthreads();
  for (int g = threadIdx.x; g < G; g += kSortThreads) counts[g * chunks + blockIdx.x] = histogram[g];
  if (blockIdx.x == 0 && threadIdx.x == 0) counts[G * chunks] = 0;  // the scan turns this into n
}

template <typename Id>
__global__ void __launch_bounds__(kSortThreads)
    scatter_chunks(const Id* ids, int64_t n, int G, int64_t chunks, const int64_t* starts, int64_t* order) {
  __shared__ unsigned long long next_slot[kMaxCountingSortGroups];  // next free slot of each group
  __shared__ int warp_counts[kSortWarps][kMaxCountingSortGroups];  // ids of a group in a warp of the tile
  for (int g = threadIdx.x; g < G; g += kSortThreads) {
    next_slot[g] = static_cast<unsigned long long>(starts[g * chunks + blockIdx.x]);
    for (int w = 0; w < kSortWarps; ++w) warp_counts[w][g] = 0;
  }
  __syncthreads();
  const int warp = threadIdx.x / cuda::kWarpSize, lane = threadIdx.x % cuda::kWarpSize;
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int64_t tile = blockIdx.x * kChunk; tile < min(n, (blockIdx.x + 1) * kChunk); tile += kSortThreads) {
    const int64_t i = tile + threadIdx.x;
    const bool valid = i < n;
    const int g = valid ? static_cast<int>(ids[i]) : -1;  // checked by count_chunks
    const unsigned peers = __match_any_sync(0xffffffffu, g);
    const bool leader = (peers & lanes_below) == 0u;  // the lowest lane of its group in this warp
    if (valid && leader) warp_counts[warp][g] = __popc(peers);
    __syncthreads();
    if (valid) {
      int64_t slot = static_cast<int64_t>(next_slot[g]) + __popc(peers & lanes_below);
      for (int w = 0; w < warp; ++w) slot += warp_counts[w][g];
      order[slot] = i;
    }
    __syncthreads();  // every slot of the tile is taken before the counters move on
    if (valid && leader) {
      atomicAdd(&next_slot[g], static_cast<unsigned long long>(__popc(peers)));
      warp_counts[warp][g] = 0;
    }
    __syncthreads();
  }
}

// offsets[g] = starts[g * chunks] (g <= G; starts[G * chunks] == n), sizes[g] = offsets[g + 1] - offsets[g].
__global__ void offsets_from_starts(const int64_t* starts, int64_t chunks, int64_t G, int64_t* offsets,
                                    int64_t* sizes) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kOffsetThreads + threadIdx.x;
  if (g > G) return;
  offsets[g] = starts[g * chunks];
  if (sizes != nullptr && g < G) sizes[g] = starts[(g + 1) * chunks] - starts[g * chunks];
}

struct CountingWorkspace {
  CountingWorkspace(cuda::Carver& carver, int64_t n, int64_t G)
      : chunks(std::max<int64_t>(1, cuda::ceil_div(n, kChunk))),
        counts(carver.take<int64_t>(G * chunks + 1)),
        starts(carver.take<int64_t>(G * chunks + 1)),
        scan_bytes(0) {
    cub::DeviceScan::ExclusiveSum(nullptr, scan_bytes, counts, starts, G * chunks + 1);
    scan = carver.take<char>(static_cast<int64_t>(scan_bytes));
  }
  int64_t chunks;
  int64_t* counts;
  int64_t* starts;
  size_t scan_bytes;
  char* scan;
};

template <typename Id>
cudaError_t counting_sort(const SortArgs& args, const Id* ids, void* workspace, cudaStream_t stream) {
  cuda::Carver carver(workspace);
  CountingWorkspace ws(carver, args.n, args.num_groups);
  const int G = static_cast<int>(args.num_groups);
  const unsigned blocks = static_cast<unsigned>(ws.chunks);
  count_chunks<<<blocks, kSortThreads, 0, stream>>>(ids, args.n, G, args.check, ws.chunks, ws.counts);
  if (cudaError_t error = cudaGetLastError(); error != cudaSuccess) return error;
  if (cudaError_t error = cub::DeviceScan::ExclusiveSum(ws.scan, ws.scan_bytes, ws.counts, ws.starts,
                                                        args.num_groups * ws.chunks + 1, stream);
      error != cudaSuccess) {
    return error;
  }
  scatter_chunks<<<blocks, kSortThreads, 0, stream>>>(ids, args.n, G, ws.chunks, ws.starts, args.order);
  offsets_from_starts<<<static_cast<unsigned>(cuda::ceil_div(args.num_groups + 1, kOffsetThreads)), kOffsetThreads,
                        0, stream>>>(ws.starts, ws.chunks, args.num_groups, args.offsets, args.sizes);
  return cudaGetLastError();
}

// ------------------------------------------------------------------------------------------- radix sort

constexpr int kKeyThreads = 256;

template <typename Id>
__global__ void make_keys(const Id* ids, int64_t n, int64_t G, IdCheck check, uint32_t* keys, int64_t* positions) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kKeyThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kKeyThreads) {
    keys[i] = static_cast<uint32_t>(checked_id(ids, i, G, check));
    positions[i] = i;
  }
}

// The first index of sorted[0, n) holding a value >= key.
__device__ int64_t lower_bound(const uint32_t* sorted, int64_t n, int64_t key) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (static_cast<int64_t>(sorted[mid]) < key) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

__global__ void offsets_by_search(const uint32_t* sorted, int64_t n, int64_t G, int64_t* offsets, int64_t* sizes) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kOffsetThreads + threadIdx.x;
  if (g > G) return;
  const int64_t first = lower_bound(sorted, n, g);
  offsets[g] = first;
  if (sizes != nullptr && g < G) sizes[g] = lower_bound(sorted, n, g + 1) - first;
}

// Bits of the largest id G - 1.
int key_bits(int64_t G) {
  int bits = 1;
  while ((int64_t{1} << bits) < G) ++bits;
  return bits;
}

struct RadixWorkspace {
  RadixWorkspace(cuda::Carver& carver, int64_t n, int64_t G)
      : keys(carver.take<uint32_t>(n)), sorted_keys(carver.take<uint32_t>(n)), positions(carver.take<int64_t>(n)),
        sort_bytes(0) {
    cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, keys, sorted_keys, positions, positions, n, 0, key_bits(G));
    sort = carver.take<char>(static_cast<int64_t>(sort_bytes));
  }
  uint32_t* keys;
  uint32_t* sorted_keys;
  int64_t* positions;
  size_t sort_bytes;
  char* sort;
};

template <typename Id>
cudaError_t radix_sort(const SortArgs& args, const Id* ids, void* workspace, cudaStream_t stream) {
  cuda::Carver carver(workspace);
  RadixWorkspace ws(carver, args.n, args.num_groups);
  const unsigned key_blocks = static_cast<unsigned>(std::min<int64_t>(cuda::ceil_div(args.n, kKeyThreads), 65536));
  make_keys<<<key_blocks, kKeyThreads, 0, stream>>>(ids, args.n, args.num_groups, args.check, ws.keys, ws.positions);
  if (cudaError_t error = cudaGetLastError(); error != cudaSuccess) return error;
  // LSD radix sort is stable: equal ids keep their (ascending) positions.
  if (cudaError_t error = cub::DeviceRadixSort::SortPairs(ws.sort, ws.sort_bytes, ws.keys, ws.sorted_keys, ws.positions,
                                                          args.order, args.n, 0, key_bits(args.num_groups), stream);
      error != cudaSuccess) {
    return error;
  }
  offsets_by_search<<<static_cast<unsigned>(cuda::ceil_div(args.num_groups + 1, kOffsetThreads)), kOffsetThreads, 0,
                      stream>>>(ws.sorted_keys, args.n, args.num_groups, args.offsets, args.sizes);
  return cudaGetLastError();
}

bool use_counting_sort(int64_t G) { return G <= kMaxCountingSortGroups; }

}  // namespace

size_t stable_sort_workspace_bytes(int64_t n, int64_t num_groups) {
  if (n == 0) return 0;
  cuda::Carver carver(nullptr);
  if (use_counting_sort(num_groups)) {
    CountingWorkspace ws(carver, n, num_groups);
  } else {
    RadixWorkspace ws(carver, n, num_groups);
  }
  return carver.used();
}

cudaError_t stable_sort(const SortArgs& args, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (args.n == 0) {  // every group is empty
    if (cudaError_t error = cudaMemsetAsync(args.offsets, 0, sizeof(int64_t) * (args.num_groups + 1), stream);
        error != cudaSuccess) {
      return error;
    }
    return args.sizes == nullptr || args.num_groups == 0
               ? cudaSuccess
               : cudaMemsetAsync(args.sizes, 0, sizeof(int64_t) * args.num_groups, stream);
  }
  if (workspace_bytes < stable_sort_workspace_bytes(args.n, args.num_groups)) return cudaErrorInvalidValue;
  return dispatch_id(args.id_type, [&](auto tag) {
    using Id = decltype(tag);
    const Id* ids = static_cast<const Id*>(args.ids);
    return use_counting_sort(args.num_groups) ? counting_sort(args, ids, workspace, stream)
                                              : radix_sort(args, ids, workspace, stream);
  });
}

}  // namespace permute_cuda
}  // namespace momoe
