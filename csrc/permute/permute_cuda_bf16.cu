// scatter_rows and its backward on the GPU for bfloat16 rows (see permute_cuda_rows.cuh).
#include "permute/permute_cuda_rows.cuh"

namespace momoe {
namespace permute_cuda {
namespace detail {

cudaError_t scatter_rows_csr_bf16(const ScatterArgs& args, cudaStream_t stream) {
  return launch_scatter_rows_csr<__nv_bfloat16>(args, stream);
}

cudaError_t scatter_rows_backward_bf16(const ScatterBackwardArgs& args, cudaStream_t stream) {
  return launch_scatter_rows_backward<__nv_bfloat16>(args, stream);
}

}  // namespace detail
}  // namespace permute_cuda
}  // namespace momoe
