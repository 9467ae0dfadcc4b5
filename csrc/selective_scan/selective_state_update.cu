// One decoding step of the selective scan on CUDA: the launch and the (x, state, B/C) dtype dispatch
// of the kernel in selective_scan_cuda_step.cuh.
#include "selective_scan/selective_scan_cuda_step.cuh"

namespace momoe {
namespace scan_cuda {
namespace {

// Lanes per (batch, channel) row: enough for kStepStates states each, a power of two <= 32.
int step_group(int64_t N) {
  int group = 1;
  while (group < 32 && group * kStepStates < N) group *= 2;
  return group;
}

template <typename T, typename S, typename W>
cudaError_t launch(const StepArgs& a, cudaStream_t stream) {
  const int group = step_group(a.N);
  const int64_t threads = a.batch * a.dim * group;
  if (threads == 0) return cudaSuccess;
  const int64_t blocks = (threads + kStepThreads - 1) / kStepThreads;
  selective_state_update_kernel<T, S, W><<<static_cast<unsigned>(blocks), kStepThreads, 0, stream>>>(a, group);
  return cudaGetLastError();
}

template <typename T, typename S>
cudaError_t launch_bc(const StepArgs& a, cudaStream_t stream) {
  return a.bc_dtype == DType::kFloat32 ? launch<T, S, float>(a, stream) : launch<T, S, T>(a, stream);
}

template <typename T>
cudaError_t launch_state(const StepArgs& a, cudaStream_t stream) {
  return a.state_dtype == DType::kFloat32 ? launch_bc<T, float>(a, stream) : launch_bc<T, T>(a, stream);
}

}  // namespace

cudaError_t selective_state_update(const StepArgs& a, cudaStream_t stream) {
  switch (a.dtype) {
    case DType::kFloat32: return launch<float, float, float>(a, stream);
    case DType::kBFloat16: return launch_state<__nv_bfloat16>(a, stream);
    case DType::kFloat16: return launch_state<__half>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace scan_cuda
}  // namespace momoe
