// Unit test of the torch-free permutation core (csrc/permute/permute_kernel.h) against naive loops,
// in float and momoe_test::bf16, with several chunk counts / thread splits.
#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

#include "permute/permute_kernel.h"
#include "testing.h"

using momoe_test::bf16;
namespace pk = momoe::permute;

// Instantiate the bit-level bfloat16 path (as the glue does for c10::BFloat16); `bf16_cast` below is a
// bf16 stand-in that keeps the generic static_cast path, so both paths are checked against naive loops.
template <>
struct momoe::is_bfloat16<bf16> : std::true_type {};
struct bf16_cast : bf16 {
  using bf16::bf16;
  bf16_cast() = default;
};

// Splits [begin, end) into `parts` pieces run by std::threads: checks that results do not depend on the split.
struct ThreadFor {
  int parts;
  template <class F>
  void operator()(int64_t begin, int64_t end, int64_t /*grain*/, const F& fn) const {
    const int64_t n = end - begin;
    if (n <= 0) return;
    const int64_t chunk = (n + parts - 1) / parts;
    std::vector<std::thread> threads;
    for (int64_t b = begin; b < end; b += chunk) threads.emplace_back([&fn, b, end, chunk] { fn(b, std::min(end, b + chunk)); });
    for (auto& t : threads) t.join();
  }
};

template <typename Id>
std::vector<Id> random_ids(int64_t n, int64_t G, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int64_t> dist(0, std::max<int64_t>(G - 1, 0));
  std::vector<Id> ids(static_cast<size_t>(n));
  for (auto& v : ids) v = static_cast<Id>(dist(gen));
  return ids;
}

template <typename Id>
void test_counting_sort(int64_t n, int64_t G, int64_t chunks, int parts) {
  auto ids = random_ids<Id>(n, G, static_cast<uint32_t>(n * 31 + G));
  // Naive: for each group, the positions in ascending order.
  std::vector<int64_t> ref_order, ref_sizes(static_cast<size_t>(G), 0);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < n; ++i)
      if (static_cast<int64_t>(ids[i]) == g) {
        ref_order.push_back(i);
        ++ref_sizes[g];
      }
  std::vector<int64_t> order(static_cast<size_t>(n), -1), sizes(static_cast<size_t>(G), -1),
      offsets(static_cast<size_t>(G + 1), -1);
  int64_t bad = pk::counting_sort(ids.data(), n, G, chunks, order.data(), sizes.data(), offsets.data(), ThreadFor{parts});
  EXPECT_TRUE(bad == -1);
  EXPECT_TRUE(order == ref_order);
  EXPECT_TRUE(sizes == ref_sizes);
  int64_t running = 0;
  for (int64_t g = 0; g <= G; ++g) {
    EXPECT_TRUE(offsets[g] == running);
    if (g < G) running += ref_sizes[g];
  }
}

void test_counting_sort_bad_ids() {
  std::vector<int32_t> ids = {0, 1, 2, 5, 1, -1};
  std::vector<int64_t> order(ids.size(), -7), sizes(3, -7);
  EXPECT_TRUE(pk::counting_sort(ids.data(), 6, 3, 1, order.data(), sizes.data(), nullptr, pk::SerialFor{}) == 3);
  EXPECT_TRUE(pk::counting_sort(ids.data(), 6, 3, 3, order.data(), sizes.data(), nullptr, ThreadFor{3}) == 3);
  EXPECT_TRUE(sizes[0] == -7 && order[0] == -7);  // untouched on error
  EXPECT_TRUE(pk::find_out_of_range(ids.data(), 6, 3) == 3);
  EXPECT_TRUE(pk::find_out_of_range(ids.data(), 3, 3) == -1);
  std::vector<uint8_t> small = {0, 200};
  EXPECT_TRUE(pk::find_out_of_range(small.data(), 2, 200) == 1);
  // n = 0 and G = 0.
  EXPECT_TRUE(pk::counting_sort(ids.data(), 0, 0, 4, order.data(), sizes.data(), nullptr, pk::SerialFor{}) == -1);
  EXPECT_TRUE(pk::counting_sort(ids.data(), 2, 0, 1, order.data(), sizes.data(), nullptr, pk::SerialFor{}) == 0);
}

template <typename T>
std::vector<T> to_t(const std::vector<float>& v) {
  return std::vector<T>(v.begin(), v.end());
}

template <typename T>
std::vector<float> to_f(const std::vector<T>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = static_cast<float>(v[i]);
  return out;
}

template <typename T>
void test_gather(int64_t T_rows, int64_t D, int64_t R, int64_t x_stride, int parts) {
  auto x = to_t<T>(momoe_test::randn(static_cast<size_t>(std::max<int64_t>(T_rows * x_stride, 1)), 7));
  auto idx = random_ids<int16_t>(R, T_rows, 11);
  std::vector<T> out(static_cast<size_t>(R * D));
  pk::gather_rows(x.data(), x_stride, D, idx.data(), R, out.data(), ThreadFor{parts});
  std::vector<float> ref(static_cast<size_t>(R * D));
  for (int64_t r = 0; r < R; ++r)
    for (int64_t d = 0; d < D; ++d) ref[r * D + d] = static_cast<float>(x[idx[r] * x_stride + d]);
  momoe_test::all_close(to_f(out).data(), ref.data(), ref.size(), 0.0f, 0.0f, "gather_rows");
}

template <typename T, typename W>
void test_scatter(int64_t num_rows, int64_t D, int64_t R, int64_t y_stride, bool weighted, int parts, float tol) {
  auto y = to_t<T>(momoe_test::randn(static_cast<size_t>(std::max<int64_t>(R * y_stride, 1)), 3));
  auto wf = momoe_test::randn(static_cast<size_t>(R), 5);
  auto w = to_t<W>(wf);
  auto idx = random_ids<int64_t>(R, num_rows, 13);
  std::vector<int64_t> order(static_cast<size_t>(R)), sizes(static_cast<size_t>(num_rows)),
      offsets(static_cast<size_t>(num_rows + 1));
  EXPECT_TRUE(pk::counting_sort(idx.data(), R, num_rows, parts, order.data(), sizes.data(), offsets.data(),
                                ThreadFor{parts}) == -1);
  std::vector<T> out(static_cast<size_t>(num_rows * D), T(123.0f));
  pk::scatter_rows_csr(y.data(), y_stride, D, order.data(), offsets.data(), weighted ? w.data() : nullptr, num_rows,
                       out.data(), ThreadFor{parts});
  // Naive: ascending r, fp32 accumulation.
  std::vector<float> ref(static_cast<size_t>(num_rows * D), 0.0f);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t d = 0; d < D; ++d)
      ref[idx[r] * D + d] += (weighted ? static_cast<float>(w[r]) : 1.0f) * static_cast<float>(y[r * y_stride + d]);
  std::vector<float> ref_t = to_f(to_t<T>(ref));
  momoe_test::all_close(to_f(out).data(), ref_t.data(), ref_t.size(), tol, tol, "scatter_rows_csr");

  // Backward against a random cotangent.
  auto g = to_t<T>(momoe_test::randn(static_cast<size_t>(std::max<int64_t>(num_rows * D, 1)), 17));
  std::vector<T> grad_y(static_cast<size_t>(R * D));
  std::vector<W> grad_w(static_cast<size_t>(R));
  pk::scatter_rows_backward(g.data(), D, y.data(), y_stride, D, idx.data(), R, weighted ? w.data() : nullptr,
                            grad_y.data(), grad_w.data(), ThreadFor{parts});
  std::vector<float> ref_gy(static_cast<size_t>(R * D)), ref_gw(static_cast<size_t>(R));
  for (int64_t r = 0; r < R; ++r) {
    float dot = 0.0f;
    for (int64_t d = 0; d < D; ++d) {
      const float gv = static_cast<float>(g[idx[r] * D + d]);
      ref_gy[r * D + d] = static_cast<float>(T((weighted ? static_cast<float>(w[r]) : 1.0f) * gv));
      dot += gv * static_cast<float>(y[r * y_stride + d]);
    }
    ref_gw[r] = dot;
  }
  momoe_test::all_close(to_f(grad_y).data(), ref_gy.data(), ref_gy.size(), tol, tol, "scatter_rows_backward dy");
  if (weighted) {
    std::vector<float> ref_gw_t = to_f(to_t<W>(ref_gw));
    const float wtol = tol * 4 + 1e-4f * static_cast<float>(D);
    momoe_test::all_close(to_f(grad_w).data(), ref_gw_t.data(), ref_gw.size(), wtol, tol * 4, "scatter_rows_backward dw");
  }
}

int main() {
  for (int parts : {1, 2, 3, 7}) {
    for (int64_t chunks : {1, 2, 5}) {
      test_counting_sort<int64_t>(1000, 7, chunks, parts);
      test_counting_sort<int8_t>(333, 5, chunks, parts);
      test_counting_sort<uint8_t>(257, 200, chunks, parts);
      test_counting_sort<int16_t>(64, 100, chunks, parts);  // many empty groups
      test_counting_sort<int32_t>(0, 3, chunks, parts);
      test_counting_sort<int32_t>(1, 1, chunks, parts);
    }
  }
  test_counting_sort_bad_ids();
  for (int parts : {1, 3}) {
    for (int64_t D : {1, 3, 37, 64}) {
      test_gather<float>(50, D, 80, D, parts);
      test_gather<float>(50, D, 80, D + 5, parts);  // strided rows
      test_gather<bf16>(50, D, 80, D, parts);
      test_gather<float>(50, D, 0, D, parts);
      for (bool weighted : {false, true}) {
        test_scatter<float, float>(40, D, 100, D, weighted, parts, 1e-5f);
        test_scatter<float, float>(40, D, 100, D + 3, weighted, parts, 1e-5f);
        test_scatter<float, float>(200, D, 30, D, weighted, parts, 1e-5f);  // rows that receive nothing
        test_scatter<bf16, bf16>(40, D, 100, D, weighted, parts, 1e-2f);
        test_scatter<bf16, float>(40, D, 100, D, weighted, parts, 1e-2f);
        test_scatter<bf16_cast, bf16_cast>(40, D, 100, D, weighted, parts, 1e-2f);
        test_scatter<float, float>(5, D, 0, D, weighted, parts, 1e-5f);
        test_scatter<float, float>(0, D, 0, D, weighted, parts, 1e-5f);
      }
    }
  }
  return momoe_test::report("test_permute");
}
