// Grouped GEMM: the sm80 kernels for bfloat16 (see grouped_gemm_cuda_sm80.cuh).
#include <cutlass/bfloat16.h>

#include "grouped_gemm/grouped_gemm_cuda_sm80.cuh"

namespace momoe {
namespace cutlass_gemm {

const Launcher kSm80BFloat16 = sm80_launcher<cutlass::bfloat16_t>();

}  // namespace cutlass_gemm
}  // namespace momoe
