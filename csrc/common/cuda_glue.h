// Torch-side helpers shared by the CUDA glue of every op (csrc/<op>/<op>_cuda.cpp): device checks, the
// current stream, workspaces and launch errors. The kernels themselves never see torch types.
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

namespace momoe {

inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "momoe: ", name, " must be a CUDA tensor, got device ", t.device());
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// `bytes` of scratch memory on `like`'s device, from the caching allocator (ordered on the current
// stream, so it may be released as soon as the kernels using it are enqueued).
inline at::Tensor workspace(const at::Tensor& like, size_t bytes) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

// Throws with the CUDA error of a launcher (cudaSuccess passes).
inline void check_launch(cudaError_t error, const char* op) {
  TORCH_CHECK(error == cudaSuccess, "momoe: ", op, ": CUDA kernel launch failed: ", cudaGetErrorString(error));
}

// Compute capability (major) and SM count of the current device.
struct DeviceInfo {
  int major;
  int sm_count;
};

inline DeviceInfo current_device_info() {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  DeviceInfo info{};
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.sm_count, cudaDevAttrMultiProcessorCount, device));
  return info;
}

}  // namespace momoe
