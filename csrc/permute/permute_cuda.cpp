// CUDA glue of the permutation ops: input checks (permute_checks.h's, shared with the CPU glue, with
// check_cuda, plus the 32-bit id limits), allocation and the launches of the torch-free kernels in
// permute_cuda_kernel.h. Schemas live in csrc/ops.cpp.
//
// Ids are checked on the device, without a host synchronisation (the ops stay asynchronous and can be
// captured in CUDA graphs): an id out of range fails a device-side assertion naming the op and the
// argument, and the offending value and position are printed. Everything else (ranks, dtypes, devices,
// shapes) is checked on the host with the CPU kernels' messages.
//
// Legend: T tokens, R rows, D features, G groups.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "common/cuda_glue.h"
#include "permute/permute_checks.h"
#include "permute/permute_cuda_kernel.h"

namespace momoe {
namespace {

permute_cuda::IdType id_type(const at::Tensor& ids) {
  switch (ids.scalar_type()) {
    case at::kByte: return permute_cuda::IdType::kUInt8;
    case at::kChar: return permute_cuda::IdType::kInt8;
    case at::kShort: return permute_cuda::IdType::kInt16;
    case at::kInt: return permute_cuda::IdType::kInt32;
    default: return permute_cuda::IdType::kInt64;
  }
}

permute_cuda::FloatType float_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16: return permute_cuda::FloatType::kBFloat16;
    case at::kHalf: return permute_cuda::FloatType::kFloat16;
    default: return permute_cuda::FloatType::kFloat32;
  }
}

// Ids are 32-bit on the device (the group of a sort, the destination of a scatter).
void check_id_limit(int64_t limit, const char* name) {
  TORCH_CHECK(limit < std::numeric_limits<int32_t>::max(), "momoe: ", name, " must be below 2^31 - 1 on CUDA, got ",
              limit);
}

permute_cuda::WeightType weight_type(const at::Tensor& w, const at::Tensor& y) {
  if (!w.defined()) return permute_cuda::WeightType::kNone;
  return w.scalar_type() == y.scalar_type() ? permute_cuda::WeightType::kSame : permute_cuda::WeightType::kFloat32;
}

// order: positions of ids (n = ids.numel()) sorted by id, stable; offsets: (G + 1) CSR offsets; sizes (G)
// when defined.
void sort_ids(const at::Tensor& ids, int64_t G, permute_cuda::IdCheck check, at::Tensor& order, at::Tensor& offsets,
              at::Tensor* sizes) {
  const int64_t n = ids.numel();
  at::Tensor scratch = workspace(ids, permute_cuda::stable_sort_workspace_bytes(n, G));
  permute_cuda::SortArgs args{};
  args.ids = ids.data_ptr();
  args.id_type = id_type(ids);
  args.n = n;
  args.num_groups = G;
  args.check = check;
  args.order = order.data_ptr<int64_t>();
  args.offsets = offsets.data_ptr<int64_t>();
  args.sizes = sizes != nullptr ? sizes->data_ptr<int64_t>() : nullptr;
  const size_t bytes = static_cast<size_t>(scratch.numel());
  check_launch(permute_cuda::stable_sort(args, scratch.data_ptr(), bytes, current_stream()), "stable sort");
}

// out[r] = x[index[r]] (x: rows contiguous), ids checked against the rows of x with `check`.
at::Tensor gather(const at::Tensor& x, const at::Tensor& index, permute_cuda::IdCheck check) {
  const at::Tensor xr = with_contiguous_rows(x);
  const at::Tensor idx = index.contiguous();
  const int64_t R = idx.size(0), D = x.size(1), bytes = x.element_size();
  at::Tensor out = at::empty({R, D}, x.options());
  permute_cuda::GatherArgs args{};
  args.x = xr.data_ptr();
  args.x_rows = xr.size(0);
  args.x_stride_bytes = xr.stride(0) * bytes;
  args.row_bytes = D * bytes;
  args.index = idx.data_ptr();
  args.id_type = id_type(idx);
  args.R = R;
  args.check = check;
  args.out = out.data_ptr();
  check_launch(permute_cuda::gather_rows(args, current_stream()), "gather_rows");
  return out;
}

std::tuple<at::Tensor, at::Tensor> sort_by_group_cuda(const at::Tensor& group_ids, int64_t num_groups) {
  check_sort_by_group_inputs(group_ids, num_groups, check_cuda);
  check_id_limit(num_groups, "num_groups");
  const c10::cuda::CUDAGuard guard(group_ids.device());
  const at::Tensor ids = group_ids.contiguous();
  auto long_opts = group_ids.options().dtype(at::kLong);
  at::Tensor order = at::empty({ids.numel()}, long_opts);
  at::Tensor sizes = at::empty({num_groups}, long_opts);
  at::Tensor offsets = at::empty({num_groups + 1}, long_opts);
  sort_ids(ids, num_groups, permute_cuda::IdCheck::kSortByGroup, order, offsets, &sizes);
  return {order, sizes};
}

at::Tensor gather_rows_cuda(const at::Tensor& x, const at::Tensor& index) {
  check_gather_rows_inputs(x, index, check_cuda);
  const c10::cuda::CUDAGuard guard(x.device());
  return gather(x, index, permute_cuda::IdCheck::kGatherRows);
}

at::Tensor scatter_rows_cuda(const at::Tensor& y, const at::Tensor& index, int64_t num_rows,
                             const c10::optional<at::Tensor>& weight) {
  check_scatter_rows_inputs(y, index, num_rows, weight, check_cuda);
  check_id_limit(num_rows, "num_rows");
  const int64_t R = y.size(0), D = y.size(1);
  const c10::cuda::CUDAGuard guard(y.device());
  // CSR of the rows by destination: rows of one destination in ascending order.
  auto long_opts = y.options().dtype(at::kLong);
  at::Tensor order = at::empty({R}, long_opts);
  at::Tensor offsets = at::empty({num_rows + 1}, long_opts);
  sort_ids(index.contiguous(), num_rows, permute_cuda::IdCheck::kScatterRows, order, offsets, nullptr);
  const at::Tensor yr = with_contiguous_rows(y);
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  at::Tensor out = at::empty({num_rows, D}, y.options());
  permute_cuda::ScatterArgs args{};
  args.y = yr.data_ptr();
  args.y_stride = yr.stride(0);
  args.D = D;
  args.dtype = float_type(y);
  args.order = order.data_ptr<int64_t>();
  args.offsets = offsets.data_ptr<int64_t>();
  args.weight = w.defined() ? w.data_ptr() : nullptr;
  args.weight_type = weight_type(w, y);
  args.num_rows = num_rows;
  args.out = out.data_ptr();
  check_launch(permute_cuda::scatter_rows_csr(args, current_stream()), "scatter_rows");
  return out;
}

std::tuple<at::Tensor, at::Tensor> scatter_rows_backward_cuda(const at::Tensor& grad_out, const at::Tensor& y,
                                                              const at::Tensor& index,
                                                              const c10::optional<at::Tensor>& weight) {
  check_scatter_rows_backward_inputs(grad_out, y, index, weight, check_cuda);
  const int64_t R = y.size(0), D = y.size(1);
  const c10::cuda::CUDAGuard guard(y.device());
  if (!weight.has_value()) {
    return {gather(grad_out, index, permute_cuda::IdCheck::kScatterRowsBackward),
            at::empty({0}, y.options().dtype(at::kFloat))};
  }
  const at::Tensor g = with_contiguous_rows(grad_out);
  const at::Tensor yr = with_contiguous_rows(y);
  const at::Tensor idx = index.contiguous();
  const at::Tensor w = weight->contiguous();
  at::Tensor grad_y = at::empty({R, D}, y.options());
  at::Tensor grad_w = at::empty({R}, w.options());
  permute_cuda::ScatterBackwardArgs args{};
  args.grad_out = g.data_ptr();
  args.grad_rows = g.size(0);
  args.g_stride = g.stride(0);
  args.y = yr.data_ptr();
  args.y_stride = yr.stride(0);
  args.D = D;
  args.dtype = float_type(y);
  args.index = idx.data_ptr();
  args.id_type = id_type(idx);
  args.R = R;
  args.weight = w.data_ptr();
  args.weight_type = weight_type(w, y);
  args.grad_y = grad_y.data_ptr();
  args.grad_weight = grad_w.data_ptr();
  check_launch(permute_cuda::scatter_rows_backward(args, current_stream()), "scatter_rows_backward");
  return {grad_y, grad_w};
}

}  // namespace
}  // namespace momoe

TORCH_LIBRARY_IMPL(momoe, CUDA, m) {
  m.impl("sort_by_group", &momoe::sort_by_group_cuda);
  m.impl("gather_rows", &momoe::gather_rows_cuda);
  m.impl("scatter_rows", &momoe::scatter_rows_cuda);
  m.impl("scatter_rows_backward", &momoe::scatter_rows_backward_cuda);
}
