// Forward of the CUDA selective scan for fp32 inputs.
#include "selective_scan/selective_scan_cuda_launch.cuh"

namespace momoe {
namespace scan_cuda {
cudaError_t selective_scan_fwd_fp32(const ScanArgs& a, const FwdOut& o, cudaStream_t stream) {
  return launch_selective_scan_fwd<float>(a, o, stream);
}
}  // namespace scan_cuda
}  // namespace momoe
