// Two small row-wise ops that torch runs as several passes or slowly: the gated activation of the
// MLP and the greedy argmax over the vocabulary.
//
// silu_mul: x [M, 2I] (gate | up, as the merged gate_up projection writes them) -> silu(gate) * up
//   [M, I], one pass, float32. silu(g) = g / (1 + exp(-g)), exp vectorized (common.h, ~1e-7).
// argmax_rows: x [M, V] float32 -> [M] int64, the first index of the row's maximum; a row with a
//   NaN gives its first NaN, as torch.argmax does. The torch references are F.silu(g) * u and
//   torch.argmax (tests/ops/test_cpu_kernels.py).
#include "common.h"
#include "ops.h"

#include <cmath>

namespace xllm {

at::Tensor silu_mul(const at::Tensor& x) {
  check_cpu("silu_mul", x);
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0 && x.scalar_type() == at::kFloat, "silu_mul: [M, 2I] float32");
  auto xc = x.contiguous();
  const int64_t M = xc.size(0), I = xc.size(1) / 2;
  auto out = at::empty({M, I}, xc.options());
  const float* xp = xc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  auto row = [&](int64_t r) {
    const float* g = xp + r * 2 * I;
    const float* u = g + I;
    float* o = op + r * I;
    int64_t i = 0;
#ifdef XLLM_AVX2
    const __m256 one = _mm256_set1_ps(1.f);
    for (; i + 8 <= I; i += 8) {
      const __m256 gv = _mm256_loadu_ps(g + i);
      const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
      _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
    }
#endif
    for (; i < I; ++i) o[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
  };
  for_each_row(M, M * I >= (1 << 15), row);  // small batches: not worth waking the other threads
  return out;
}

at::Tensor argmax_rows(const at::Tensor& x) {
  check_cpu("argmax_rows", x);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.size(1) > 0, "argmax_rows: [M, V] float32");
  auto xc = x.contiguous();
  const int64_t M = xc.size(0), V = xc.size(1);
  auto out = at::empty({M}, xc.options().dtype(at::kLong));
  const float* xp = xc.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  auto row = [&](int64_t r) {
    const float* v = xp + r * V;
    float mx = -INFINITY;
    bool nan = false;
    int64_t i = 0;
#ifdef XLLM_AVX2
    __m256 m8 = _mm256_set1_ps(-INFINITY), bad = _mm256_setzero_ps();
    for (; i + 8 <= V; i += 8) {
      const __m256 a = _mm256_loadu_ps(v + i);
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
      m8 = _mm256_max_ps(m8, a);
    }
    nan = _mm256_movemask_ps(bad) != 0;
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, m8);
    for (float l : lanes) mx = std::max(mx, l);
#endif
    for (; i < V; ++i) {
      nan |= std::isnan(v[i]);
      mx = std::max(mx, v[i]);
    }
    int64_t best = 0;
    if (nan) {
      while (!std::isnan(v[best])) ++best;
    } else {
      while (v[best] != mx) ++best;  // the first index of the maximum
    }
    op[r] = best;
  };
  for_each_row(M, M * V >= (1 << 16), row);
  return out;
}

}  // namespace xllm
