// CUDA glue of the grouped GEMM: input checks (grouped_gemm_checks.h's, shared with the CPU glue, with
// check_cuda), operands in the layout the CUTLASS kernels take, and the launch (grouped_gemm_cuda_kernel.h).
// Schemas live in csrc/ops.cpp.
//
// group_sizes may live on the host or on x's device. Host sizes are checked here, with the CPU kernel's
// messages, before they are copied over (asynchronously). Device sizes are never read by the host (no
// synchronisation in the forward or backward pass): the kernel that builds the per-group problems checks
// them, and a negative size or a wrong total fails a device-side assertion
// ("momoe: grouped_gemm: group_sizes ...").
//
// Shape legend: T tokens (rows of x), K input features, N output features, G groups.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "common/cuda_glue.h"
#include "grouped_gemm/grouped_gemm_checks.h"
#include "grouped_gemm/grouped_gemm_cuda_kernel.h"

namespace momoe {
namespace {

cutlass_gemm::Dtype kernel_dtype(at::ScalarType s) {
  switch (s) {
    case at::kBFloat16: return cutlass_gemm::Dtype::kBFloat16;
    case at::kHalf: return cutlass_gemm::Dtype::kFloat16;
    default: return cutlass_gemm::Dtype::kFloat32;
  }
}

// The device check of group_sizes: on the host or on x's device (valid while x is).
auto on_host_or_device_of(const at::Tensor& x) {
  return [&x](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.is_cpu() || t.device() == x.device(), "momoe: ", name, " must be on the CPU or on x's device ",
                x.device(), ", got ", t.device());
  };
}

// The CUTLASS kernels index with 32-bit ints.
void check_int32(int64_t value, const char* what) {
  TORCH_CHECK(value <= std::numeric_limits<int32_t>::max(), "momoe: grouped_gemm on CUDA supports ", what,
              " up to 2^31 - 1, got ", value);
}

// group_sizes as int64 on x's device. Host sizes are checked here (>= 0, summing to T), then copied from
// pinned memory without waiting for the GPU.
at::Tensor device_group_sizes(const at::Tensor& group_sizes, const at::Tensor& x, int64_t T) {
  if (!group_sizes.is_cpu()) return group_sizes.to(at::kLong).contiguous();
  return checked_host_group_sizes(group_sizes, T).pin_memory().to(x.device(), at::kLong, /*non_blocking=*/true);
}

// t as the kernels take it: dense, 16-byte aligned, its last two dimensions zero-padded at the end to
// rows x cols (row lengths a multiple of 16 bytes). Copies only what needs it.
at::Tensor gemm_operand(const at::Tensor& t, int64_t rows, int64_t cols) {
  at::Tensor out = t.contiguous();
  const int64_t pad_rows = rows - out.size(-2), pad_cols = cols - out.size(-1);
  if (pad_rows != 0 || pad_cols != 0) out = at::constant_pad_nd(out, {0, pad_cols, 0, pad_rows});
  if (reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 != 0) out = out.clone();
  return out;
}

int64_t padded(int64_t n, const at::Tensor& t) {
  const int64_t align = cutlass_gemm::alignment_elements(kernel_dtype(t.scalar_type()));
  return (n + align - 1) / align * align;
}

// Runs `product` on the padded operands: d = kernel(a, b) group by group (see cutlass_gemm::Product).
void launch(cutlass_gemm::Product product, const at::Tensor& a, const at::Tensor& b, at::Tensor& d,
            const at::Tensor& sizes, int64_t T, int64_t K, int64_t N) {
  check_int32(T, "T (rows)");
  check_int32(K, "K");
  check_int32(N, "N");
  const DeviceInfo info = current_device_info();
  TORCH_CHECK(info.major >= 8, "momoe: grouped_gemm on CUDA needs compute capability 8.0 or newer, got ", info.major,
              ".x");
  cutlass_gemm::Problem problem{};
  problem.product = product;
  problem.dtype = kernel_dtype(a.scalar_type());
  problem.a = a.data_ptr();
  problem.b = b.data_ptr();
  problem.d = d.data_ptr();
  problem.group_sizes = sizes.data_ptr<int64_t>();
  problem.T = T;
  problem.G = sizes.numel();
  problem.K = K;
  problem.N = N;
  problem.device = a.get_device();
  problem.sm_count = info.sm_count;
  const cutlass_gemm::Launcher& kernel = cutlass_gemm::select_launcher(problem.dtype, info.major);
  at::Tensor scratch = workspace(a, kernel.workspace_bytes(problem));
  const char* error = kernel.run(problem, scratch.data_ptr(), current_stream());
  TORCH_CHECK(error == nullptr, "momoe: grouped_gemm: CUDA kernel failed: ", error);
}

// y: (T, N) = per group x_g (m, K) @ w[g] (K, N), or @ w[g]^T (w: (G, N, K)) with trans_w.
at::Tensor grouped_gemm_cuda(const at::Tensor& x, const at::Tensor& w, const at::Tensor& group_sizes, bool trans_w) {
  const GroupedGemmShape shape =
      check_grouped_gemm_inputs(x, w, group_sizes, trans_w, check_cuda, on_host_or_device_of(x));
  const int64_t T = shape.T, K = shape.K, N = shape.N;
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor sizes = device_group_sizes(group_sizes, x, T);
  const int64_t Kp = padded(K, x), Np = padded(N, x);
  const at::Tensor x_TK = gemm_operand(x, T, Kp);
  const at::Tensor w_G = trans_w ? gemm_operand(w, Np, Kp) : gemm_operand(w, Kp, Np);
  at::Tensor y = at::empty({T, Np}, x.options());
  launch(trans_w ? cutlass_gemm::Product::kXWt : cutlass_gemm::Product::kXW, x_TK, w_G, y, sizes, T, Kp, Np);
  return Np == N ? y : y.narrow(1, 0, N).contiguous();
}

// dw: (G, K, N) = per group x_g^T (K, m) @ dy_g (m, N); with trans_w (G, N, K) = dy_g^T @ x_g, the layout
// of w. Zero for empty groups.
at::Tensor grouped_gemm_dw_cuda(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& group_sizes,
                                bool trans_w) {
  const int64_t T = check_grouped_gemm_dw_inputs(x, dy, group_sizes, check_cuda, on_host_or_device_of(x)).T;
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor sizes = device_group_sizes(group_sizes, x, T);
  // dw[g] = a_g^T @ b_g with (a, b) = (x, dy), or (dy, x) for the (G, N, K) layout.
  const at::Tensor& a = trans_w ? dy : x;
  const at::Tensor& b = trans_w ? x : dy;
  const int64_t P = a.size(1), Q = b.size(1), Pp = padded(P, a), Qp = padded(Q, b);
  at::Tensor d = at::empty({sizes.numel(), Pp, Qp}, x.options());
  launch(cutlass_gemm::Product::kAtB, gemm_operand(a, T, Pp), gemm_operand(b, T, Qp), d, sizes, T, Pp, Qp);
  return Pp == P && Qp == Q ? d : d.narrow(1, 0, P).narrow(2, 0, Q).contiguous();
}

}  // namespace
}  // namespace momoe

TORCH_LIBRARY_IMPL(momoe, CUDA, m) {
  m.impl("grouped_gemm", &momoe::grouped_gemm_cuda);
  m.impl("grouped_gemm_dw", &momoe::grouped_gemm_dw_cuda);
}
