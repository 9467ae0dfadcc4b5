// Backward of the CUDA selective scan for float16 inputs.
#include "selective_scan/selective_scan_cuda_launch.cuh"

namespace momoe {
namespace scan_cuda {
cudaError_t selective_scan_bwd_fp16(const ScanArgs& a, const BwdOut& o, cudaStream_t stream) {
  return launch_selective_scan_bwd<__half>(a, o, stream);
}
}  // namespace scan_cuda
}  // namespace momoe
