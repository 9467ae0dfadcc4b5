// Grouped GEMM: the sm80 kernels for float16 (see grouped_gemm_cuda_sm80.cuh).
#include <cutlass/half.h>

#include "grouped_gemm/grouped_gemm_cuda_sm80.cuh"

namespace momoe {
namespace cutlass_gemm {

const Launcher kSm80Float16 = sm80_launcher<cutlass::half_t>();

}  // namespace cutlass_gemm
}  // namespace momoe
