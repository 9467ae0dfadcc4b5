// CPU glue of the permutation ops: input checks (permute_checks.h's, with check_cpu, and id ranges checked
// here), allocation, dtype dispatch and parallelism around the torch-free core in permute_kernel.h. Schemas
// live in csrc/ops.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <cstdlib>

#include "common/c10_types.h"
#include "permute/permute_checks.h"
#include "permute/permute_kernel.h"

namespace momoe {
namespace {

// Outputs of tens of MiB are fresh mmap'ed memory whose 4 KiB first-touch page faults cost more than
// the copy itself; asking for transparent huge pages on the 2 MiB-aligned interior makes them 512x fewer
// (the same thing c10's THP_MEM_ALLOC_ENABLE does for every allocation). A hint only: errors are ignored;
// MOMOE_NO_THP=1 (read once) turns it off.
at::Tensor empty_rows(int64_t rows, int64_t cols, const at::TensorOptions& options) {
  at::Tensor out = at::empty({rows, cols}, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool enabled = [] {
    const char* off = std::getenv("MOMOE_NO_THP");
    return off == nullptr || off[0] != '1';
  }();
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const size_t nbytes = out.nbytes();
  if (enabled && nbytes >= 16 * kHuge) {  // >= 32 MiB: always mmap'ed by glibc
    const uintptr_t begin = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = (begin + nbytes) & ~(kHuge - 1);
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return out;
}

struct TorchFor {
  template <class F>
  void operator()(int64_t begin, int64_t end, int64_t grain, const F& fn) const {
    at::parallel_for(begin, end, grain, fn);
  }
};

// Calls f(Id{}) with the C++ type of an integer id dtype.
template <class F>
void dispatch_id(at::ScalarType s, const F& f) {
  switch (s) {
    case at::kByte: return f(uint8_t{});
    case at::kChar: return f(int8_t{});
    case at::kShort: return f(int16_t{});
    case at::kInt: return f(int32_t{});
    case at::kLong: return f(int64_t{});
    default: TORCH_CHECK(false, "momoe: unsupported id dtype ", s);
  }
}

// Calls f(T{}) with the C++ type of a floating dtype.
template <class F>
void dispatch_float(at::ScalarType s, const F& f) {
  switch (s) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    default: TORCH_CHECK(false, "momoe: unsupported dtype ", s);
  }
}

// Throws with the offending value when some id lies outside [0, limit).
void check_ids_in_range(const at::Tensor& ids, int64_t limit, const char* name, const char* what) {
  int64_t bad = -1;
  dispatch_id(ids.scalar_type(), [&](auto tag) {
    using Id = decltype(tag);
    bad = permute::find_out_of_range(ids.const_data_ptr<Id>(), ids.numel(), limit);
  });
  if (bad >= 0) {
    const int64_t value = ids.reshape({-1})[bad].item<int64_t>();
    TORCH_CHECK(false, "momoe: ", name, " must be in [0, ", limit, ") (", what, "), got ", value, " at position ",
                bad);
  }
}

std::tuple<at::Tensor, at::Tensor> sort_by_group(const at::Tensor& group_ids, int64_t num_groups) {
  check_sort_by_group_inputs(group_ids, num_groups, check_cpu);
  const at::Tensor ids = group_ids.contiguous();
  const int64_t n = ids.numel();
  auto long_opts = group_ids.options().dtype(at::kLong);
  at::Tensor order = at::empty({n}, long_opts);
  at::Tensor sizes = at::empty({num_groups}, long_opts);
  int64_t bad = -1;
  dispatch_id(ids.scalar_type(), [&](auto tag) {
    using Id = decltype(tag);
    const int64_t chunks = permute::sort_chunks(n, num_groups, at::get_num_threads());
    bad = permute::counting_sort(ids.const_data_ptr<Id>(), n, num_groups, chunks, order.mutable_data_ptr<int64_t>(),
                                 sizes.mutable_data_ptr<int64_t>(), nullptr, TorchFor{});
  });
  if (bad >= 0) {
    const int64_t value = ids.reshape({-1})[bad].item<int64_t>();
    TORCH_CHECK(false, "momoe: group_ids must be in [0, num_groups=", num_groups, "), got ", value,
                " at flat position ", bad);
  }
  return {order, sizes};
}

at::Tensor gather_rows(const at::Tensor& x, const at::Tensor& index) {
  check_gather_rows_inputs(x, index, check_cpu);
  const at::Tensor idx = index.contiguous();
  check_ids_in_range(idx, x.size(0), "index", "the rows of x");
  const at::Tensor xr = with_contiguous_rows(x);
  const int64_t R = idx.size(0), D = x.size(1);
  at::Tensor out = empty_rows(R, D, x.options());
  dispatch_float(x.scalar_type(), [&](auto ttag) {
    using T = decltype(ttag);
    dispatch_id(idx.scalar_type(), [&](auto itag) {
      using Id = decltype(itag);
      permute::gather_rows(xr.const_data_ptr<T>(), xr.stride(0), D, idx.const_data_ptr<Id>(), R,
                           out.mutable_data_ptr<T>(), TorchFor{});
    });
  });
  return out;
}

at::Tensor scatter_rows(const at::Tensor& y, const at::Tensor& index, int64_t num_rows,
                        const c10::optional<at::Tensor>& weight) {
  check_scatter_rows_inputs(y, index, num_rows, weight, check_cpu);
  const int64_t R = y.size(0), D = y.size(1);
  const at::Tensor idx = index.contiguous();
  // CSR of the rows by destination (stable: rows of one destination in ascending r).
  std::vector<int64_t> order(static_cast<size_t>(R)), sizes(static_cast<size_t>(num_rows)),
      offsets(static_cast<size_t>(num_rows + 1));
  int64_t bad = -1;
  dispatch_id(idx.scalar_type(), [&](auto tag) {
    using Id = decltype(tag);
    const int64_t chunks = permute::sort_chunks(R, num_rows, at::get_num_threads());
    bad = permute::counting_sort(idx.const_data_ptr<Id>(), R, num_rows, chunks, order.data(), sizes.data(),
                                 offsets.data(), TorchFor{});
  });
  if (bad >= 0) {
    const int64_t value = idx[bad].item<int64_t>();
    TORCH_CHECK(false, "momoe: index must be in [0, num_rows=", num_rows, "), got ", value, " at position ", bad);
  }
  const at::Tensor yr = with_contiguous_rows(y);
  at::Tensor out = empty_rows(num_rows, D, y.options());
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  dispatch_float(y.scalar_type(), [&](auto ttag) {
    using T = decltype(ttag);
    if (w.defined() && w.scalar_type() != y.scalar_type()) {
      permute::scatter_rows_csr(yr.const_data_ptr<T>(), yr.stride(0), D, order.data(), offsets.data(),
                                w.const_data_ptr<float>(), num_rows, out.mutable_data_ptr<T>(), TorchFor{});
    } else {
      permute::scatter_rows_csr(yr.const_data_ptr<T>(), yr.stride(0), D, order.data(), offsets.data(),
                                w.defined() ? w.const_data_ptr<T>() : static_cast<const T*>(nullptr), num_rows,
                                out.mutable_data_ptr<T>(), TorchFor{});
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> scatter_rows_backward(const at::Tensor& grad_out, const at::Tensor& y,
                                                         const at::Tensor& index,
                                                         const c10::optional<at::Tensor>& weight) {
  check_scatter_rows_backward_inputs(grad_out, y, index, weight, check_cpu);
  const int64_t R = y.size(0), D = y.size(1);
  const at::Tensor idx = index.contiguous();
  check_ids_in_range(idx, grad_out.size(0), "index", "the rows of grad_out");
  const at::Tensor g = with_contiguous_rows(grad_out);
  const at::Tensor yr = with_contiguous_rows(y);
  at::Tensor grad_y = empty_rows(R, D, y.options());
  at::Tensor grad_w;
  at::Tensor w;
  if (weight.has_value()) {
    w = weight->contiguous();
    grad_w = at::empty({R}, w.options());
  } else {
    grad_w = at::empty({0}, y.options().dtype(at::kFloat));
  }
  dispatch_float(y.scalar_type(), [&](auto ttag) {
    using T = decltype(ttag);
    dispatch_id(idx.scalar_type(), [&](auto itag) {
      using Id = decltype(itag);
      const Id* ids = idx.const_data_ptr<Id>();
      if (w.defined() && w.scalar_type() != y.scalar_type()) {
        permute::scatter_rows_backward(g.const_data_ptr<T>(), g.stride(0), yr.const_data_ptr<T>(), yr.stride(0), D,
                                       ids, R, w.const_data_ptr<float>(), grad_y.mutable_data_ptr<T>(),
                                       grad_w.mutable_data_ptr<float>(), TorchFor{});
      } else {
        permute::scatter_rows_backward(g.const_data_ptr<T>(), g.stride(0), yr.const_data_ptr<T>(), yr.stride(0), D,
                                       ids, R, w.defined() ? w.const_data_ptr<T>() : static_cast<const T*>(nullptr),
                                       grad_y.mutable_data_ptr<T>(),
                                       w.defined() ? grad_w.mutable_data_ptr<T>() : static_cast<T*>(nullptr),
                                       TorchFor{});
      }
    });
  });
  return {grad_y, grad_w};
}

}  // namespace
}  // namespace momoe

TORCH_LIBRARY_IMPL(momoe, CPU, m) {
  m.impl("sort_by_group", &momoe::sort_by_group);
  m.impl("gather_rows", &momoe::gather_rows);
  m.impl("scatter_rows", &momoe::scatter_rows);
  m.impl("scatter_rows_backward", &momoe::scatter_rows_backward);
}
