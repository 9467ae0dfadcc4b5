// scatter_rows and its backward on the GPU for float16 rows (see permute_cuda_rows.cuh).
#include "permute/permute_cuda_rows.cuh"

namespace momoe {
namespace permute_cuda {
namespace detail {

cudaError_t scatter_rows_csr_f16(const ScatterArgs& args, cudaStream_t stream) {
  return launch_scatter_rows_csr<__half>(args, stream);
}

cudaError_t scatter_rows_backward_f16(const ScatterBackwardArgs& args, cudaStream_t stream) {
  return launch_scatter_rows_backward<__half>(args, stream);
}

}  // namespace detail
}  // namespace permute_cuda
}  // namespace momoe
