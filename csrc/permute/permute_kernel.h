// Torch-free core of the permutation ops (token dispatch / combine):
//   * counting_sort      stable counting sort of ids by group (sort_by_group, and the CSR of scatter_rows)
//   * gather_rows        out[r] = x[index[r]]                        (row memcpy)
//   * scatter_rows_csr   out[i] = sum_{r: index[r] == i} w[r] * y[r] (fp32 accumulation, r ascending)
//   * scatter_rows_backward  grad_y[r] = w[r] * g[index[r]], grad_w[r] = <g[index[r]], y[r]>
//
// Element types T: float, c10::BFloat16 / c10::Half (in the glue) or momoe_test::bf16 (in the C++ tests);
// values are converted with static_cast<float>(v) and T(f) (bit-level for types marked momoe::is_bfloat16, see common/bfloat16.h).
// Weights W are T or float.
// Parallelism is injected: every driver takes `pf(begin, end, grain, fn)` which must call
// fn(b, e) on disjoint sub-ranges covering [begin, end) (at::parallel_for in the glue, SerialFor in tests).
// Every result is independent of how pf splits the ranges (fixed summation orders).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/bfloat16.h"

namespace momoe {
namespace permute {

using momoe::load_float;
using momoe::store_float;

// Runs fn on the whole range in the calling thread.
struct SerialFor {
  template <class F>
  void operator()(int64_t begin, int64_t end, int64_t /*grain*/, const F& fn) const {
    if (begin < end) fn(begin, end);
  }
};

// Index of the first id outside [0, limit), or -1 when all are valid. ids are read as int64.
template <typename Id>
int64_t find_out_of_range(const Id* ids, int64_t n, int64_t limit) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = static_cast<int64_t>(ids[i]);
    if (v < 0 || v >= limit) return i;
  }
  return -1;
}

// How many chunks the counting sort of n ids into G groups uses: at most `threads`, each chunk at
// least ~4096 ids, and the per-chunk histograms (chunks * G counters) no larger than ~8n.
inline int64_t sort_chunks(int64_t n, int64_t G, int64_t threads) {
  int64_t chunks = std::min<int64_t>(threads, n / 4096);
  if (G > 0) chunks = std::min<int64_t>(chunks, (8 * n) / G);
  return std::max<int64_t>(chunks, 1);
}

// Stable counting sort: order[j] lists the positions i in [0, n) sorted by ids[i] (ties keep their
// order), sizes[g] = #{i : ids[i] == g}; `offsets` (optional, G + 1 entries) receives the exclusive
// prefix sum of sizes. Per-chunk histograms + scan + per-chunk stable scatter, so the result does not
// depend on `chunks`. Returns -1, or the first position whose id is outside [0, G) (then order, sizes
// and offsets are left untouched).
template <typename Id, class ParFor>
int64_t counting_sort(const Id* ids, int64_t n, int64_t G, int64_t chunks, int64_t* order, int64_t* sizes,
                      int64_t* offsets, const ParFor& pf) {
  chunks = std::max<int64_t>(1, std::min<int64_t>(chunks, std::max<int64_t>(n, 1)));
  const int64_t chunk_len = (n + chunks - 1) / chunks;
  std::vector<int64_t> counts(static_cast<size_t>(chunks * G), 0);
  std::vector<int64_t> bad(static_cast<size_t>(chunks), -1);
  pf(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b = c * chunk_len, e = std::min(n, b + chunk_len);
      int64_t* cnt = counts.data() + c * G;
      for (int64_t i = b; i < e; ++i) {
        const int64_t v = static_cast<int64_t>(ids[i]);
        if (v < 0 || v >= G) {
          bad[c] = i;
          break;
        }
        ++cnt[v];
      }
    }
  });
  for (int64_t c = 0; c < chunks; ++c)
    if (bad[c] >= 0) return bad[c];
  // counts[c][g] becomes the first output slot of chunk c's ids of group g.
  int64_t running = 0;
  for (int64_t g = 0; g < G; ++g) {
    if (offsets) offsets[g] = running;
    const int64_t start = running;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t k = counts[c * G + g];
      counts[c * G + g] = running;
      running += k;
    }
    sizes[g] = running - start;
  }
  if (offsets) offsets[G] = running;
  pf(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b = c * chunk_len, e = std::min(n, b + chunk_len);
      int64_t* slot = counts.data() + c * G;
      for (int64_t i = b; i < e; ++i) order[slot[static_cast<int64_t>(ids[i])]++] = i;
    }
  });
  return -1;
}

// Rows per parallel task so that each moves at least ~64 KiB.
inline int64_t row_grain(int64_t row_bytes) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(row_bytes, 1)); }

// out[r, :] = x[index[r], :] for r in [0, R); x rows are x_stride elements apart, out is contiguous (R, D).
// Ids must already be validated to lie in [0, rows of x).
template <typename T, typename Id, class ParFor>
void gather_rows(const T* x, int64_t x_stride, int64_t D, const Id* index, int64_t R, T* out, const ParFor& pf) {
  const size_t row_bytes = sizeof(T) * static_cast<size_t>(D);
  if (row_bytes == 0) return;
  pf(0, R, row_grain(static_cast<int64_t>(row_bytes)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      std::memcpy(out + r * D, x + static_cast<int64_t>(index[r]) * x_stride, row_bytes);
  });
}

// acc[d] (+)= w * src[d] over D elements; the first contribution assigns.
template <typename T>
MOMOE_CPU_CLONES void axpy_row(float* acc, const T* src, float w, int64_t D, bool first) {
  if (first) {
    for (int64_t d = 0; d < D; ++d) acc[d] = w * load_float(src, d);
  } else {
    for (int64_t d = 0; d < D; ++d) acc[d] += w * load_float(src, d);
  }
}

// Row loops as functions taking D by value: inside the parallel lambdas D is captured by reference and
// the compiler could not prove the stores leave it unchanged, which blocks vectorization.
template <typename T>
inline void fill_zero_row(T* dst, int64_t D) {
  for (int64_t d = 0; d < D; ++d) store_float(dst, d, 0.0f);
}

// dst = w0 * y0 (+ w1 * y1 when y1 is non-null) (+ acc when acc is non-null, added first).
template <typename T>
MOMOE_CPU_CLONES void combine_row(T* dst, const float* acc, const T* y0, float w0, int64_t D) {
  if (acc) {
    for (int64_t d = 0; d < D; ++d) store_float(dst, d, acc[d] + w0 * load_float(y0, d));
  } else {
    for (int64_t d = 0; d < D; ++d) store_float(dst, d, w0 * load_float(y0, d));
  }
}

template <typename T>
MOMOE_CPU_CLONES void combine_two_rows(T* dst, const T* y0, float w0, const T* y1, float w1, int64_t D) {
  for (int64_t d = 0; d < D; ++d) store_float(dst, d, w0 * load_float(y0, d) + w1 * load_float(y1, d));
}

// Combine through a CSR of the rows by destination: rows order[offsets[i] .. offsets[i + 1]) (ascending r,
// as counting_sort gives them) are summed, weighted by weight[r] when weight is non-null, into out[i]
// (contiguous (num_rows, D)); rows with no contribution are zero. fp32 accumulation in a fixed order.
template <typename T, typename W, class ParFor>
void scatter_rows_csr(const T* y, int64_t y_stride, int64_t D, const int64_t* order, const int64_t* offsets,
                      const W* weight, int64_t num_rows, T* out, const ParFor& pf) {
  if (D == 0) return;
  const int64_t R = offsets[num_rows];
  const int64_t avg_rows = num_rows > 0 ? std::max<int64_t>(1, R / num_rows) : 1;
  const int64_t grain = row_grain(static_cast<int64_t>(sizeof(T)) * D * (avg_rows + 1));
  pf(0, num_rows, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> buffer;
    for (int64_t i = i0; i < i1; ++i) {
      T* dst = out + i * D;
      const int64_t b = offsets[i], e = offsets[i + 1];
      if (b == e) {
        fill_zero_row(dst, D);
        continue;
      }
      if (e - b == 1 && weight == nullptr) {
        std::memcpy(dst, y + order[b] * y_stride, sizeof(T) * static_cast<size_t>(D));
        continue;
      }
      auto w_of = [&](int64_t j) { return weight ? static_cast<float>(weight[order[j]]) : 1.0f; };
      if constexpr (std::is_same<T, float>::value) {
        // Accumulate in the output row itself, in ascending r.
        for (int64_t j = b; j < e; ++j) axpy_row(dst, y + order[j] * y_stride, w_of(j), D, j == b);
      } else if (e - b <= 2) {
        // One or two rows (permutations, top-2 combine): one fused pass, same arithmetic as below.
        const T* y0 = y + order[b] * y_stride;
        const float w0 = w_of(b);
        if (e - b == 1) {
          combine_row(dst, static_cast<const float*>(nullptr), y0, w0, D);
        } else {
          combine_two_rows(dst, y0, w0, y + order[b + 1] * y_stride, w_of(b + 1), D);
        }
      } else {
        if (buffer.empty()) buffer.resize(static_cast<size_t>(D));
        float* acc = buffer.data();
        for (int64_t j = b; j + 1 < e; ++j) axpy_row(acc, y + order[j] * y_stride, w_of(j), D, j == b);
        combine_row(dst, static_cast<const float*>(acc), y + order[e - 1] * y_stride, w_of(e - 1), D);
      }
    }
  });
}

// Dot product of two rows in fp32 with 8 interleaved partial sums (a fixed order, vectorizable).
template <typename T>
MOMOE_CPU_CLONES float dot_row(const T* a, const T* b, int64_t D) {
  float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    for (int k = 0; k < 8; ++k) part[k] += load_float(a, d + k) * load_float(b, d + k);
  for (int k = 0; d < D; ++d, ++k) part[k] += load_float(a, d) * load_float(b, d);
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

// Backward of scatter_rows for r in [0, R): grad_y[r] = w[r] * grad_out[index[r]] (a plain copy when weight
// is null) and, when weight is non-null, grad_w[r] = dot(grad_out[index[r]], y[r]) in fp32.
// grad_y is contiguous (R, D); ids must already be validated to lie in [0, rows of grad_out).
template <typename T, typename W, typename Id, class ParFor>
void scatter_rows_backward(const T* grad_out, int64_t g_stride, const T* y, int64_t y_stride, int64_t D,
                           const Id* index, int64_t R, const W* weight, T* grad_y, W* grad_w, const ParFor& pf) {
  if (weight == nullptr) {
    gather_rows(grad_out, g_stride, D, index, R, grad_y, pf);
    return;
  }
  pf(0, R, row_grain(static_cast<int64_t>(sizeof(T)) * D * 3), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* g = grad_out + static_cast<int64_t>(index[r]) * g_stride;
      const float w = static_cast<float>(weight[r]);
      combine_row(grad_y + r * D, static_cast<const float*>(nullptr), g, w, D);
      grad_w[r] = W(dot_row(g, y + r * y_stride, D));
    }
  });
}

}  // namespace permute
}  // namespace momoe
