// Device, dtype and shape checks of the permutation ops' inputs, shared by the CPU glue (permute_cpu.cpp)
// and the CUDA glue (permute_cuda.cpp) so that both backends raise the same messages, plus a small tensor
// helper both use. Each glue passes its own device check in: the inputs of an op must share one device
// (checked first, pair by pair), then the glue's check runs on each of them. Id ranges stay in the glue
// (the CPU checks them on the host, the CUDA kernels on the device), as do the CUDA glue's 32-bit limits.
//
// Shapes: group_ids `(T,)` or `(T, k)`; x `(T, D)`, index `(R,)` for gather_rows; y `(R, D)`, index and
// weight `(R,)` for scatter_rows; grad_out `(num_rows, D)` for scatter_rows_backward.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

#include "common/checks.h"

namespace momoe {

// A 2-D tensor whose rows are contiguous (any row stride); copies only when the columns are strided.
inline at::Tensor with_contiguous_rows(const at::Tensor& t) {
  if (t.size(1) <= 1 || t.stride(1) == 1) return t;
  return t.contiguous();
}

namespace permute_checks_detail {

// Checks the float matrix `rows` (n, D) and the integer `index` (R,): one device (then `check_device` on
// each), dtypes and ranks.
inline void check_rows_and_index(const at::Tensor& rows, const char* rows_name, const at::Tensor& index,
                                 DeviceCheck check_device) {
  check_same_device(rows, rows_name, index, "index");
  check_device(rows, rows_name);
  check_device(index, "index");
  check_float(rows, rows_name);
  check_dim(rows, 2, rows_name);
  check_index(index, "index");
  check_dim(index, 1, "index");
}

// Checks what comes one per row of y (R, D): index (R,) and the optional weight (R,), on y's device, of
// y's dtype or float32.
inline void check_per_row_inputs(const at::Tensor& y, const at::Tensor& index, const std::optional<at::Tensor>& weight,
                                 DeviceCheck check_device) {
  const int64_t R = y.size(0);
  TORCH_CHECK(index.size(0) == R, "momoe: index must have one entry per row of y (", R, "), got shape ",
              index.sizes());
  if (!weight.has_value()) return;
  const at::Tensor& w = *weight;
  check_same_device(w, "weight", y, "y");
  check_device(w, "weight");
  check_dim(w, 1, "weight");
  TORCH_CHECK(w.size(0) == R, "momoe: weight must have shape (", R, ",) (one per row of y), got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == y.scalar_type() || w.scalar_type() == at::kFloat, "momoe: weight must be ",
              y.scalar_type(), " (like y) or float32, got ", w.scalar_type());
}

}  // namespace permute_checks_detail

// Checks sort_by_group's inputs (ids not range-checked).
inline void check_sort_by_group_inputs(const at::Tensor& group_ids, int64_t num_groups, DeviceCheck check_device) {
  check_device(group_ids, "group_ids");
  check_index(group_ids, "group_ids");
  TORCH_CHECK(group_ids.dim() == 1 || group_ids.dim() == 2,
              "momoe: group_ids must have shape (T,) or (T, k), got shape ", group_ids.sizes());
  TORCH_CHECK(num_groups >= 0, "momoe: num_groups must be >= 0, got ", num_groups);
}

// Checks gather_rows's inputs (ids not range-checked).
inline void check_gather_rows_inputs(const at::Tensor& x, const at::Tensor& index, DeviceCheck check_device) {
  permute_checks_detail::check_rows_and_index(x, "x", index, check_device);
}

// Checks scatter_rows's inputs (ids not range-checked).
inline void check_scatter_rows_inputs(const at::Tensor& y, const at::Tensor& index, int64_t num_rows,
                                      const std::optional<at::Tensor>& weight, DeviceCheck check_device) {
  permute_checks_detail::check_rows_and_index(y, "y", index, check_device);
  TORCH_CHECK(num_rows >= 0, "momoe: num_rows must be >= 0, got ", num_rows);
  permute_checks_detail::check_per_row_inputs(y, index, weight, check_device);
}

// Checks scatter_rows_backward's inputs (ids not range-checked against the rows of grad_out).
inline void check_scatter_rows_backward_inputs(const at::Tensor& grad_out, const at::Tensor& y,
                                               const at::Tensor& index, const std::optional<at::Tensor>& weight,
                                               DeviceCheck check_device) {
  check_same_device(grad_out, "grad_out", y, "y");
  permute_checks_detail::check_rows_and_index(y, "y", index, check_device);
  check_device(grad_out, "grad_out");
  check_dim(grad_out, 2, "grad_out");
  TORCH_CHECK(grad_out.scalar_type() == y.scalar_type(), "momoe: grad_out must have y's dtype ", y.scalar_type(),
              ", got ", grad_out.scalar_type());
  TORCH_CHECK(grad_out.size(1) == y.size(1), "momoe: grad_out must have ", y.size(1), " columns (like y), got shape ",
              grad_out.sizes());
  permute_checks_detail::check_per_row_inputs(y, index, weight, check_device);
}

}  // namespace momoe
