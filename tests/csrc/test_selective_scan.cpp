// Unit test of the torch-free selective-scan core (csrc/selective_scan/selective_scan_kernel.h):
// forward and decode step against a naive double-precision loop (float and bf16, with modality,
// groups, initial state, chunk boundary L = 300), backward against central finite differences of
// the naive loop on a tiny case.
#include <cmath>
#include <cstdio>
#include <vector>

#include "selective_scan/selective_scan_kernel.h"
#include "testing.h"

using momoe_test::bf16;
namespace ss = momoe::scan;
namespace kern = momoe::generic::scan;

namespace {

struct Problem {
  int64_t batch, dim, L, N, G, M;
  bool softplus, has_mod, has_D, has_z, has_bias, has_init;
  std::vector<float> u, delta, z, A, B, C, D, bias, init;  // B, C: (batch, G, L, N)
  std::vector<int32_t> mod;
};

Problem make_problem(int64_t batch, int64_t dim, int64_t L, int64_t N, int64_t G, int64_t M, bool has_mod,
                     uint32_t seed) {
  Problem p{batch, dim, L, N, G, M, true, has_mod, true, true, true, true, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}};
  p.u = momoe_test::randn(batch * dim * L, seed);
  p.delta = momoe_test::randn(batch * dim * L, seed + 1);
  for (auto& x : p.delta) x = 0.5f * x - 1.0f;
  p.z = momoe_test::randn(batch * dim * L, seed + 2);
  p.A = momoe_test::randn(M * dim * N, seed + 3);
  for (auto& x : p.A) x = -std::exp(0.5f * x);
  p.B = momoe_test::randn(batch * G * L * N, seed + 4);
  p.C = momoe_test::randn(batch * G * L * N, seed + 5);
  p.D = momoe_test::randn(M * dim, seed + 6);
  p.bias = momoe_test::randn(M * dim, seed + 7);
  for (auto& x : p.bias) x *= 0.3f;
  p.init = momoe_test::randn(batch * dim * N, seed + 8);
  p.mod.resize(batch * L);
  for (int64_t i = 0; i < batch * L; ++i) p.mod[i] = has_mod ? static_cast<int32_t>((i * 7 + i / 5) % M) : 0;
  return p;
}

// Naive forward in double: out (batch, dim, L) and last state (batch, dim, N).
void naive_forward(const Problem& p, std::vector<double>& out, std::vector<double>& last) {
  out.assign(p.batch * p.dim * p.L, 0.0);
  last.assign(p.batch * p.dim * p.N, 0.0);
  const int64_t dpg = p.dim / p.G;
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t d = 0; d < p.dim; ++d) {
      const int64_t g = d / dpg;
      std::vector<double> h(p.N, 0.0);
      if (p.has_init)
        for (int64_t n = 0; n < p.N; ++n) h[n] = p.init[(b * p.dim + d) * p.N + n];
      for (int64_t t = 0; t < p.L; ++t) {
        const int64_t m = p.has_mod ? p.mod[b * p.L + t] : 0;
        const int64_t i = (b * p.dim + d) * p.L + t;
        double dt = p.delta[i] + (p.has_bias ? p.bias[m * p.dim + d] : 0.0);
        if (p.softplus) dt = dt > 20.0 ? dt : std::log1p(std::exp(dt));
        double y = 0.0;
        for (int64_t n = 0; n < p.N; ++n) {
          const int64_t bc = ((b * p.G + g) * p.L + t) * p.N + n;
          h[n] = std::exp(dt * p.A[(m * p.dim + d) * p.N + n]) * h[n] + dt * p.B[bc] * p.u[i];
          y += h[n] * p.C[bc];
        }
        if (p.has_D) y += p.D[m * p.dim + d] * p.u[i];
        if (p.has_z) y *= p.z[i] / (1.0 + std::exp(-static_cast<double>(p.z[i])));
        out[i] = y;
      }
      for (int64_t n = 0; n < p.N; ++n) last[(b * p.dim + d) * p.N + n] = h[n];
    }
}

template <typename T>
std::vector<T> cast(const std::vector<float>& v) {
  std::vector<T> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = T(v[i]);
  return r;
}

template <typename T>
std::vector<float> to_float(const std::vector<T>& v) {
  std::vector<float> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = static_cast<float>(v[i]);
  return r;
}

std::vector<float> to_float(const std::vector<double>& v) {
  return std::vector<float>(v.begin(), v.end());
}

// mamba-ssm's (batch, dim, L) contiguous layout.
ss::Layout channel_major(const Problem& p) { return {p.dim * p.L, p.L, 1}; }

template <typename T>
ss::ScanArgs<T> args_of(const Problem& p, const std::vector<T>& u, const std::vector<T>& delta,
                        const std::vector<T>& z) {
  ss::ScanArgs<T> a;
  a.batch = p.batch;
  a.dim = p.dim;
  a.L = p.L;
  a.N = p.N;
  a.G = p.G;
  a.M = p.M;
  a.u = u.data();
  a.delta = delta.data();
  a.z = p.has_z ? z.data() : nullptr;
  a.lu = a.ldelta = a.lz = channel_major(p);
  a.A = p.A.data();
  a.B = p.B.data();
  a.C = p.C.data();
  a.D = p.has_D ? p.D.data() : nullptr;
  a.delta_bias = p.has_bias ? p.bias.data() : nullptr;
  a.modality = p.has_mod ? p.mod.data() : nullptr;
  a.initial_state = p.has_init ? p.init.data() : nullptr;
  a.softplus = p.softplus;
  return a;
}

template <typename T>
void run_forward(const Problem& p, std::vector<float>& out, std::vector<float>& last, std::vector<float>& chunks) {
  const auto u = cast<T>(p.u), delta = cast<T>(p.delta), z = cast<T>(p.z);
  std::vector<T> o(p.batch * p.dim * p.L);
  last.assign(p.batch * p.dim * p.N, 0.0f);
  chunks.assign(p.batch * p.dim * ss::num_chunks(p.L) * p.N, 0.0f);
  const auto a = args_of<T>(p, u, delta, z);
  ss::FwdOut<T> fo{o.data(), channel_major(p), last.data(), chunks.data()};
  std::vector<float> ws(ss::fwd_scratch_floats(p.N, p.M));
  kern::fwd_tasks<T>(a, fo, 0, ss::fwd_num_tasks(p.batch, p.dim, p.G), ws.data());
  out = to_float(o);
}

template <typename T>
void test_forward(const Problem& p, float tol, const char* what) {
  std::vector<double> ref_out, ref_last;
  naive_forward(p, ref_out, ref_last);
  std::vector<float> out, last, chunks;
  run_forward<T>(p, out, last, chunks);
  momoe_test::all_close(out.data(), to_float(ref_out).data(), out.size(), tol, tol, what);
  momoe_test::all_close(last.data(), to_float(ref_last).data(), last.size(), tol, tol, what);
  // chunk 0 holds the initial state.
  for (int64_t r = 0; r < p.batch * p.dim && p.L > 0; ++r)
    for (int64_t n = 0; n < p.N; ++n)
      EXPECT_TRUE(chunks[(r * ss::num_chunks(p.L)) * p.N + n] == (p.has_init ? p.init[r * p.N + n] : 0.0f));
}

// The decode step, token by token, equals the scan.
void test_decode(const Problem& p) {
  std::vector<double> ref_out, ref_last;
  naive_forward(p, ref_out, ref_last);
  std::vector<float> state(p.init);
  if (!p.has_init) state.assign(p.batch * p.dim * p.N, 0.0f);
  std::vector<float> out(p.batch * p.dim * p.L);
  std::vector<float> x(p.batch * p.dim), dt(p.batch * p.dim), z(p.batch * p.dim), y(p.batch * p.dim);
  std::vector<float> B(p.batch * p.G * p.N), C(p.batch * p.G * p.N);
  std::vector<int32_t> mod(p.batch);
  for (int64_t t = 0; t < p.L; ++t) {
    for (int64_t r = 0; r < p.batch * p.dim; ++r) {
      x[r] = p.u[r * p.L + t];
      dt[r] = p.delta[r * p.L + t];
      z[r] = p.z[r * p.L + t];
    }
    for (int64_t b = 0; b < p.batch; ++b) {
      mod[b] = p.mod[b * p.L + t];
      for (int64_t g = 0; g < p.G; ++g)
        for (int64_t n = 0; n < p.N; ++n) {
          B[(b * p.G + g) * p.N + n] = p.B[((b * p.G + g) * p.L + t) * p.N + n];
          C[(b * p.G + g) * p.N + n] = p.C[((b * p.G + g) * p.L + t) * p.N + n];
        }
    }
    ss::StepArgs<float, float> a{p.batch, p.dim, p.N, p.G, p.M, state.data(), x.data(), dt.data(),
                                 p.has_z ? z.data() : nullptr, p.A.data(), B.data(), C.data(),
                                 p.has_D ? p.D.data() : nullptr, p.has_bias ? p.bias.data() : nullptr,
                                 p.has_mod ? mod.data() : nullptr, p.softplus, y.data()};
    kern::step_rows<float, float>(a, 0, p.batch * p.dim);
    for (int64_t r = 0; r < p.batch * p.dim; ++r) out[r * p.L + t] = y[r];
  }
  momoe_test::all_close(out.data(), to_float(ref_out).data(), out.size(), 1e-4f, 1e-4f, "decode out");
  momoe_test::all_close(state.data(), to_float(ref_last).data(), state.size(), 1e-4f, 1e-4f, "decode state");
}

// Backward vs central finite differences of loss = sum(out * wo) + sum(last * wl) (naive, double).
void test_backward(Problem p) {
  const auto wo = momoe_test::randn(p.batch * p.dim * p.L, 99);
  const auto wl = momoe_test::randn(p.batch * p.dim * p.N, 98);
  auto loss = [&](const Problem& q) {
    std::vector<double> o, l;
    naive_forward(q, o, l);
    double s = 0.0;
    for (size_t i = 0; i < o.size(); ++i) s += o[i] * wo[i];
    for (size_t i = 0; i < l.size(); ++i) s += l[i] * wl[i];
    return s;
  };
  std::vector<float> out, last, chunks;
  run_forward<float>(p, out, last, chunks);
  const int64_t BDL = p.batch * p.dim * p.L, bpg = ss::blocks_per_group(p.dim, p.G);
  std::vector<float> du(BDL), ddelta(BDL), dz(BDL);
  std::vector<float> dBp(p.batch * p.G * bpg * p.L * p.N, 0.0f), dCp(dBp.size(), 0.0f);
  std::vector<float> dAp(p.batch * p.M * p.dim * p.N), dDp(p.batch * p.M * p.dim), dbp(p.batch * p.M * p.dim);
  std::vector<float> dinit(p.batch * p.dim * p.N);
  const ss::Layout cm = channel_major(p);
  ss::BwdOut<float> o{wo.data(), wl.data(), chunks.data(), du.data(), ddelta.data(), dz.data(), cm, cm, cm, cm,
                      dBp.data(), dCp.data(), dAp.data(), dDp.data(), dbp.data(), dinit.data()};
  const auto a = args_of<float>(p, p.u, p.delta, p.z);
  std::vector<float> ws(ss::bwd_scratch_floats(p.N, p.M));
  kern::bwd_tasks<float>(a, o, 0, ss::bwd_num_tasks(p.batch, p.dim, p.G), ws.data());
  // Reduce the partials (blocks, then batch).
  auto reduce = [](const std::vector<float>& part, int64_t P, int64_t R, int64_t Q) {
    std::vector<float> r(P * Q, 0.0f);
    for (int64_t i = 0; i < P; ++i)
      for (int64_t j = 0; j < R; ++j)
        for (int64_t k = 0; k < Q; ++k) r[i * Q + k] += part[(i * R + j) * Q + k];
    return r;
  };
  const auto dB = reduce(dBp, p.batch * p.G, bpg, p.L * p.N), dC = reduce(dCp, p.batch * p.G, bpg, p.L * p.N);
  const auto dA = reduce(dAp, 1, p.batch, p.M * p.dim * p.N), dD = reduce(dDp, 1, p.batch, p.M * p.dim);
  const auto dbias = reduce(dbp, 1, p.batch, p.M * p.dim);

  struct Check {
    const char* name;
    std::vector<float> Problem::*field;
    const std::vector<float>* grad;
  };
  const Check checks[] = {{"du", &Problem::u, &du},       {"ddelta", &Problem::delta, &ddelta},
                          {"dz", &Problem::z, &dz},       {"dA", &Problem::A, &dA},
                          {"dB", &Problem::B, &dB},       {"dC", &Problem::C, &dC},
                          {"dD", &Problem::D, &dD},       {"ddelta_bias", &Problem::bias, &dbias},
                          {"dinit", &Problem::init, &dinit}};
  for (const auto& c : checks) {
    const size_t n = (p.*(c.field)).size();
    std::vector<float> fd(n);
    for (size_t i = 0; i < n; ++i) {
      Problem q = p;
      const double eps = 1e-3;
      (q.*(c.field))[i] = static_cast<float>((p.*(c.field))[i] + eps);
      const double up = loss(q);
      (q.*(c.field))[i] = static_cast<float>((p.*(c.field))[i] - eps);
      const double down = loss(q);
      const double h = static_cast<double>((p.*(c.field))[i] + static_cast<float>(eps)) -
                       static_cast<double>((p.*(c.field))[i] - static_cast<float>(eps));
      fd[i] = static_cast<float>((up - down) / h);
    }
    momoe_test::all_close(c.grad->data(), fd.data(), n, 2e-2f, 2e-2f, c.name);
  }
}

}  // namespace

int main() {
  // row_sums_16x16 against a plain loop.
  {
    const auto x = momoe_test::randn(256, 7);
    float got[16], want[16];
    kern::row_sums_16x16(x.data(), got);
    for (int n = 0; n < 16; ++n) {
      want[n] = 0.0f;
      for (int c = 0; c < 16; ++c) want[n] += x[n * 16 + c];
    }
    momoe_test::all_close(got, want, 16, 1e-5f, 1e-5f, "row_sums_16x16");
  }
  // Forward: float and bf16; modality and groups; L = 300 crosses the 256-step chunk boundary.
  for (bool has_mod : {false, true}) {
    Problem p = make_problem(2, 40, 300, 16, has_mod ? 2 : 1, has_mod ? 3 : 1, has_mod, 11);
    test_forward<float>(p, 2e-4f, "forward float");
    test_forward<bf16>(p, 5e-2f, "forward bf16");
    Problem q = p;
    q.softplus = false;
    q.has_z = q.has_D = q.has_bias = q.has_init = false;
    for (auto& x : q.delta) x = std::fabs(x) * 0.1f;
    test_forward<float>(q, 2e-4f, "forward float (plain)");
    q.N = 5;  // N not a multiple of 16
    q.A.resize(q.M * q.dim * q.N);
    q.B.resize(q.batch * q.G * q.L * q.N);
    q.C.resize(q.B.size());
    test_forward<float>(q, 2e-4f, "forward float (N = 5)");
  }
  // Decode step == scan, step by step.
  test_decode(make_problem(2, 24, 9, 16, 2, 3, true, 21));
  test_decode(make_problem(1, 8, 5, 4, 1, 1, false, 22));
  // Backward vs finite differences (tiny: every input element is perturbed).
  test_backward(make_problem(1, 18, 6, 3, 2, 2, true, 31));
  test_backward(make_problem(2, 5, 4, 2, 1, 1, false, 32));
  return momoe_test::report("test_selective_scan");
}
