// Forward of the CUDA selective scan for bfloat16 inputs.
#include "selective_scan/selective_scan_cuda_launch.cuh"

namespace momoe {
namespace scan_cuda {
cudaError_t selective_scan_fwd_bf16(const ScanArgs& a, const FwdOut& o, cudaStream_t stream) {
  return launch_selective_scan_fwd<__nv_bfloat16>(a, o, stream);
}
}  // namespace scan_cuda
}  // namespace momoe
