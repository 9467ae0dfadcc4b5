// scatter_rows and its backward on the GPU for float32 rows (see permute_cuda_rows.cuh).
#include "permute/permute_cuda_rows.cuh"

namespace momoe {
namespace permute_cuda {
namespace detail {

cudaError_t scatter_rows_csr_f32(const ScatterArgs& args, cudaStream_t stream) {
  return launch_scatter_rows_csr<float>(args, stream);
}

cudaError_t scatter_rows_backward_f32(const ScatterBackwardArgs& args, cudaStream_t stream) {
  return launch_scatter_rows_backward<float>(args, stream);
}

}  // namespace detail
}  // namespace permute_cuda
}  // namespace momoe
