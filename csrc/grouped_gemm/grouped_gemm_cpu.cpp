// Grouped GEMM on the CPU: y[rows of g] = x[rows of g] @ w[g] (w[g]^T with trans_w) and its
// weight gradient dw[g] = x[rows of g]^T @ dy[rows of g].
//
// Each group is one call to ATen's GEMM (`at::mm_out`) that writes straight into its slice of
// the output (a run of equal-size groups is one `at::bmm_out`): MKL for fp32, oneDNN (AMX for
// bf16, AVX-512-FP16 for fp16) for the others, all with fp32 accumulation (checked by the tests
// at K = 16384). fp16 GEMMs run at about fp32 speed on this CPU (no AMX-FP16), ~5x slower than bf16.
// There is no torch-free core here on purpose: the per-group work *is* a BLAS call, and a hand-written
// kernel would be slower than the vendor GEMMs it would replace.
//
// Threading: large groups use the GEMM's own threads, one group after another. When the groups
// are many and small (each GEMM too small to keep every thread busy), the groups themselves are
// spread over threads with at::parallel_for and each GEMM runs single-threaded inside it.
//
// Input checks are grouped_gemm_checks.h's (shared with the CUDA glue), with check_cpu.
//
// Shape legend: T tokens (rows of x), K input features, N output features, G groups.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "grouped_gemm/grouped_gemm_checks.h"

namespace momoe {
namespace {

// Below this many multiply-adds per group, one GEMM cannot keep all threads busy, so many such
// groups are better run side by side, one single-threaded GEMM per thread.
constexpr int64_t kSmallGroupMacs = int64_t(1) << 24;

// oneDNN (the bf16 and fp16 GEMMs) generates and caches a kernel for every new GEMM shape, which
// costs several milliseconds (3-12 ms measured at K=1024, N=2816) -- as much as the GEMM itself --
// while group sizes change at every training step. So the bf16/fp16 GEMMs only ever see row
// counts that are multiples of kRowQuantum (plus fewer than kRowQuantum small ones): a bounded set
// of shapes that stays cached. MKL's fp32 GEMM has no per-shape set-up and gets exact shapes.
constexpr int64_t kRowQuantum = 32;

int64_t row_quantum(const at::Tensor& x) { return x.scalar_type() == at::kFloat ? 1 : kRowQuantum; }

// One GEMM of the forward: rows [row, row + rows) of x times w[g].
struct Window {
  int64_t g, row, rows;
};

// The windows that compute group g (rows [row, row + m)). With `spill`, the row count is rounded
// up to a multiple of q and the extra rows, which belong to later groups, are overwritten when
// those groups are computed later (the caller runs windows in order); the rounded window must
// end inside x. Otherwise the group is covered by a multiple-of-q window from its start and a
// q-row window ending at its end (the overlap is recomputed with the same weights).
void add_windows(std::vector<Window>& out, int64_t g, int64_t row, int64_t m, int64_t T, int64_t q, bool spill) {
  const int64_t up = (m + q - 1) / q * q;
  if (up == m || m < q) {
    out.push_back({g, row, m});
  } else if (spill && row + up <= T) {
    out.push_back({g, row, up});
  } else {
    out.push_back({g, row, m / q * q});
    out.push_back({g, row + m - q, q});
  }
}

// Reads group_sizes (any integer dtype, on the host) once, checked by checked_host_group_sizes (each
// size >= 0, summing to T). Returns the sizes as int64.
std::vector<int64_t> read_group_sizes(const at::Tensor& group_sizes, int64_t T) {
  const at::Tensor sizes = checked_host_group_sizes(group_sizes, T);
  const int64_t* p = sizes.const_data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + sizes.numel());
}

// A matrix whose strides a GEMM can take as they are (one of the two strides is 1); otherwise a
// contiguous copy, made once rather than inside every per-group GEMM.
at::Tensor gemm_ready(const at::Tensor& t) {
  const int64_t last = t.dim() - 1;
  if (t.stride(last) == 1 || t.stride(last - 1) == 1) return t;
  return t.contiguous();
}

// Spread the groups over threads (each GEMM single-threaded) when they are many and small.
bool spread_groups(const std::vector<int64_t>& sizes, int64_t macs_per_row) {
  int64_t nonempty = 0, max_rows = 0;
  for (int64_t m : sizes) {
    nonempty += m > 0;
    max_rows = std::max(max_rows, m);
  }
  const int64_t threads = at::get_num_threads();
  return threads > 1 && !at::in_parallel_region() && nonempty >= 2 * threads &&
         max_rows * macs_per_row <= kSmallGroupMacs;
}

std::vector<int64_t> group_begins(const std::vector<int64_t>& sizes) {
  std::vector<int64_t> begin(sizes.size() + 1, 0);
  for (size_t g = 0; g < sizes.size(); ++g) begin[g + 1] = begin[g] + sizes[g];
  return begin;
}

// y: (T, N) = per group x_g (m, K) @ w[g] (K, N), or @ w[g]^T (w: (G, N, K)) with trans_w.
at::Tensor grouped_gemm_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& group_sizes,
                            bool trans_w) {
  const GroupedGemmShape shape = check_grouped_gemm_inputs(x, w, group_sizes, trans_w, check_cpu, check_cpu);
  const int64_t T = shape.T, K = shape.K, N = shape.N, G = shape.G;
  const std::vector<int64_t> sizes = read_group_sizes(group_sizes, T);

  at::Tensor y = at::empty({T, N}, x.options());
  if (T == 0 || N == 0) return y;
  if (K == 0) return y.zero_();
  const at::Tensor x_TK = gemm_ready(x);
  const at::Tensor w_G = gemm_ready(w);
  auto gemm = [&](const Window& win) {
    const at::Tensor w_g = w_G.select(0, win.g);
    at::Tensor y_w = y.narrow(0, win.row, win.rows);
    at::mm_out(y_w, x_TK.narrow(0, win.row, win.rows), trans_w ? w_g.t() : w_g);
  };
  const int64_t q = row_quantum(x);
  const std::vector<int64_t> begin = group_begins(sizes);
  if (spread_groups(sizes, K * N)) {
    // The GEMMs are ATen ops: worker threads need this thread's dispatch state (below autograd).
    const at::ThreadLocalState state;
    at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
      const at::ThreadLocalStateGuard guard(state);
      std::vector<Window> windows;
      for (int64_t g = g0; g < g1; ++g) {
        if (sizes[g] > 0) add_windows(windows, g, begin[g], sizes[g], T, q, /*spill=*/false);
      }
      for (const Window& win : windows) gemm(win);
    });
    return y;
  }
  // One group after another, each GEMM using all threads. In bf16/fp16, a run of consecutive groups
  // of the same size that is a multiple of the row quantum (expert-choice routing with a fixed
  // capacity, balanced splits) is one batched GEMM (~3% faster than a loop at 8 x 1024 rows). Other
  // runs, and every fp32 run, are looped: a batched GEMM of 5 x 682 rows measured 15% slower than
  // five GEMMs (MKL fp32 and oneDNN bf16 alike).
  for (int64_t g = 0; g < G;) {
    const int64_t m = sizes[g];
    int64_t h = g + 1;
    while (h < G && sizes[h] == m) ++h;
    if (m > 0 && h - g >= 2 && q > 1 && m % q == 0) {
      const at::Tensor w_r = w_G.narrow(0, g, h - g);
      at::Tensor y_r = y.narrow(0, begin[g], m * (h - g)).view({h - g, m, N});
      at::bmm_out(y_r, x_TK.narrow(0, begin[g], m * (h - g)).view({h - g, m, K}), trans_w ? w_r.transpose(1, 2) : w_r);
      g = h;
      continue;
    }
    for (; g < h; ++g) {
      if (m == 0) continue;
      std::vector<Window> windows;
      add_windows(windows, g, begin[g], m, T, q, /*spill=*/true);
      for (const Window& win : windows) gemm(win);
    }
  }
  return y;
}

// dw: (G, K, N) = per group x_g^T (K, m) @ dy_g (m, N); with trans_w (G, N, K) = dy_g^T @ x_g,
// the layout of w. Zero for empty groups.
at::Tensor grouped_gemm_dw_cpu(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& group_sizes,
                               bool trans_w) {
  const GroupedGemmShape shape = check_grouped_gemm_dw_inputs(x, dy, group_sizes, check_cpu, check_cpu);
  const int64_t T = shape.T, K = shape.K, N = shape.N, G = shape.G;
  const std::vector<int64_t> sizes = read_group_sizes(group_sizes, T);

  at::Tensor dw = trans_w ? at::empty({G, N, K}, x.options()) : at::empty({G, K, N}, x.options());
  if (dw.numel() == 0) return dw;
  for (int64_t g = 0; g < G; ++g) {
    if (sizes[g] == 0) dw.select(0, g).zero_();
  }
  const at::Tensor x_TK = gemm_ready(x);
  const at::Tensor dy_TN = gemm_ready(dy);
  // Rows are the reduction here, so they cannot be rounded up like the forward's: each group is
  // one GEMM of its exact size (a bf16 split into two GEMMs would round the partial sum to bf16).
  auto group = [&](int64_t g, int64_t row, int64_t m) {
    const at::Tensor x_r = x_TK.narrow(0, row, m), dy_r = dy_TN.narrow(0, row, m);
    at::Tensor dw_g = dw.select(0, g);
    if (trans_w) {
      at::mm_out(dw_g, dy_r.t(), x_r);
    } else {
      at::mm_out(dw_g, x_r.t(), dy_r);
    }
  };
  const std::vector<int64_t> begin = group_begins(sizes);
  if (spread_groups(sizes, K * N)) {
    // The GEMMs are ATen ops: worker threads need this thread's dispatch state (below autograd).
    const at::ThreadLocalState state;
    at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
      const at::ThreadLocalStateGuard guard(state);
      for (int64_t g = g0; g < g1; ++g) {
        if (sizes[g] > 0) group(g, begin[g], sizes[g]);
      }
    });
  } else {
    for (int64_t g = 0; g < G; ++g) {
      if (sizes[g] > 0) group(g, begin[g], sizes[g]);
    }
  }
  return dw;
}

}  // namespace
}  // namespace momoe

TORCH_LIBRARY_IMPL(momoe, CPU, m) {
  m.impl("grouped_gemm", &momoe::grouped_gemm_cpu);
  m.impl("grouped_gemm_dw", &momoe::grouped_gemm_dw_cpu);
}
