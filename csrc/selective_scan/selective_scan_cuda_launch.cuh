// Launchers of the selective-scan kernels, instantiated once per dtype by selective_scan_{fwd,bwd}_*.cu.
#pragma once
#include "selective_scan/selective_scan_cuda_bwd.cuh"
#include "selective_scan/selective_scan_cuda_fwd.cuh"

namespace momoe {
namespace scan_cuda {

// Opts a kernel in to `bytes` of dynamic shared memory when that is above the default 48 KiB.
template <typename Kernel>
cudaError_t allow_dynamic_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <typename T>
cudaError_t launch_selective_scan_fwd(const ScanArgs& a, const FwdOut& o, cudaStream_t stream) {
  const int64_t blocks = num_blocks(a, kFwdChannels);
  if (blocks == 0 || a.L == 0) return cudaSuccess;
  auto kernel = selective_scan_fwd_kernel<T, kFwdChannels, kFwdItems>;
  const size_t smem = fwd_smem_bytes(a.N, a.M);
  const cudaError_t err = allow_dynamic_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(blocks), kFwdChannels * (kChunk / kFwdItems), smem, stream>>>(a, o);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_selective_scan_bwd(const ScanArgs& a, const BwdOut& o, cudaStream_t stream) {
  const int64_t blocks = num_blocks(a, kBwdChannels);
  if (blocks == 0 || a.L == 0) return cudaSuccess;
  auto kernel = selective_scan_bwd_kernel<T, kBwdChannels, kBwdItems>;
  const size_t smem = bwd_smem_bytes(a.N, a.M);
  const cudaError_t err = allow_dynamic_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(blocks), kBwdChannels * (kChunk / kBwdItems), smem, stream>>>(a, o);
  return cudaGetLastError();
}

}  // namespace scan_cuda
}  // namespace momoe
