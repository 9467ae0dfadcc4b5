// Dtype, shape and device checks of the grouped GEMM's inputs, shared by the CPU glue (grouped_gemm_cpu.cpp)
// and the CUDA glue (grouped_gemm_cuda.cpp) so that both backends raise the same messages, and the check of
// group sizes read on the host. Each glue passes in two device checks: one for x and w (or dy), which must
// share a device (checked first), and one for group_sizes (the CPU glue: on the CPU; the CUDA glue: on the
// CPU or on x's device). Group sizes that live on a CUDA device are checked by the CUDA kernels.
//
// Shapes: x `(T, K)`; w `(G, K, N)`, or `(G, N, K)` with trans_w; dy `(T, N)`; group_sizes `(G,)`.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

#include "common/checks.h"

namespace momoe {

// Sizes of a grouped GEMM: T rows of x, K input features, N output features, G groups.
struct GroupedGemmShape {
  int64_t T, K, N, G;
};

namespace grouped_gemm_checks_detail {

// Checks x (T, K), the other operand `other_name` (w or dy, x's dtype and device) and group_sizes
// (an integer vector): dtypes, the ranks of x and group_sizes, then devices.
inline void check_operands(const at::Tensor& x, const at::Tensor& other, const char* other_name,
                           const at::Tensor& group_sizes, DeviceCheck check_device, DeviceCheck check_sizes_device) {
  check_dim(x, 2, "x");
  check_float(x, "x");
  check_float(other, other_name);
  TORCH_CHECK(other.scalar_type() == x.scalar_type(), "momoe: x and ", other_name, " must have the same dtype, got ",
              x.scalar_type(), " and ", other.scalar_type());
  check_dim(group_sizes, 1, "group_sizes");
  check_index(group_sizes, "group_sizes");
  check_same_device(x, "x", other, other_name);
  check_device(x, "x");
  check_device(other, other_name);
  check_sizes_device(group_sizes, "group_sizes");
}

}  // namespace grouped_gemm_checks_detail

// Checks grouped_gemm's inputs (not the values of group_sizes) and returns their sizes.
inline GroupedGemmShape check_grouped_gemm_inputs(const at::Tensor& x, const at::Tensor& w,
                                                  const at::Tensor& group_sizes, bool trans_w,
                                                  DeviceCheck check_device, DeviceCheck check_sizes_device) {
  grouped_gemm_checks_detail::check_operands(x, w, "w", group_sizes, check_device, check_sizes_device);
  check_dim(w, 3, "w");
  GroupedGemmShape s;
  s.T = x.size(0);
  s.K = x.size(1);
  s.N = trans_w ? w.size(1) : w.size(2);
  s.G = w.size(0);
  const int64_t Kw = trans_w ? w.size(2) : w.size(1);
  TORCH_CHECK(Kw == s.K, "momoe: x has K = ", s.K, " features but w",
              trans_w ? " (trans_w=True, shape (G, N, K))" : " (shape (G, K, N))", " has K = ", Kw, "; x: ", x.sizes(),
              ", w: ", w.sizes());
  TORCH_CHECK(group_sizes.size(0) == s.G, "momoe: group_sizes must have one entry per group of w (G = ", s.G,
              "), got ", group_sizes.size(0));
  return s;
}

// Checks grouped_gemm_dw's inputs (not the values of group_sizes) and returns their sizes.
inline GroupedGemmShape check_grouped_gemm_dw_inputs(const at::Tensor& x, const at::Tensor& dy,
                                                     const at::Tensor& group_sizes, DeviceCheck check_device,
                                                     DeviceCheck check_sizes_device) {
  grouped_gemm_checks_detail::check_operands(x, dy, "dy", group_sizes, check_device, check_sizes_device);
  check_dim(dy, 2, "dy");
  TORCH_CHECK(dy.size(0) == x.size(0), "momoe: x and dy must have the same number of rows (T), got x: ", x.sizes(),
              ", dy: ", dy.sizes());
  return {x.size(0), x.size(1), dy.size(1), group_sizes.size(0)};
}

// group_sizes (G,) of any integer dtype, on the host, as contiguous int64 after checking that each size
// is >= 0 and that they sum to T (the rows of x).
inline at::Tensor checked_host_group_sizes(const at::Tensor& group_sizes, int64_t T) {
  const at::Tensor sizes = group_sizes.to(at::kLong).contiguous();
  const int64_t* p = sizes.const_data_ptr<int64_t>();
  int64_t sum = 0;
  for (int64_t g = 0; g < sizes.numel(); ++g) {
    TORCH_CHECK(p[g] >= 0, "momoe: group_sizes must be >= 0, got group_sizes[", g, "] = ", p[g]);
    sum += p[g];
  }
  TORCH_CHECK(sum == T, "momoe: group_sizes must sum to the number of rows of x (T) = ", T, ", got sum ", sum);
  return sizes;
}

}  // namespace momoe
