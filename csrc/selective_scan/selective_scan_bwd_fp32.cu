// Backward of the CUDA selective scan for fp32 inputs.
#include "selective_scan/selective_scan_cuda_launch.cuh"

namespace momoe {
namespace scan_cuda {
cudaError_t selective_scan_bwd_fp32(const ScanArgs& a, const BwdOut& o, cudaStream_t stream) {
  return launch_selective_scan_bwd<float>(a, o, stream);
}
}  // namespace scan_cuda
}  // namespace momoe
