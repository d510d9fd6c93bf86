// Rotary position embedding (rotate-half / NeoX layout), applied in place to q and k, float32.
//
// q [T, H, D] and k [T, Hkv, D] may be strided views (rows of the fused q/k/v projection output)
// but each head's D values are contiguous. cos/sin [T, D] are the per-token tables the model
// computes once per step. For i < D/2: x'[i] = x[i] cos[i] - x[i + D/2] sin[i] and
// x'[i + D/2] = x[i + D/2] cos[i + D/2] + x[i] sin[i + D/2]. The torch reference is
// RotaryEmbedding.apply in xllm/layers/rotary.py.
#include "common.h"
#include "ops.h"

namespace xllm {
namespace {

void rotate(float* x, const float* c, const float* s, int64_t half) {
  int64_t i = 0;
#ifdef XLLM_AVX2
  for (; i + 8 <= half; i += 8) {
    __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + half + i);
    __m256 ra = _mm256_fmsub_ps(a, _mm256_loadu_ps(c + i), _mm256_mul_ps(b, _mm256_loadu_ps(s + i)));
    __m256 rb = _mm256_fmadd_ps(b, _mm256_loadu_ps(c + half + i), _mm256_mul_ps(a, _mm256_loadu_ps(s + half + i)));
    _mm256_storeu_ps(x + i, ra);
    _mm256_storeu_ps(x + half + i, rb);
  }
#endif
  for (; i < half; ++i) {
    const float a = x[i], b = x[half + i];
    x[i] = a * c[i] - b * s[i];
    x[half + i] = b * c[half + i] + a * s[half + i];
  }
}

void check(const at::Tensor& x, int64_t T, int64_t D) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 3 && x.size(0) == T && x.size(2) == D && x.stride(2) == 1,
              "rope: q/k must be float32 [T, heads, D] with contiguous heads");
}

}  // namespace

void rope_(at::Tensor& q, at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin) {
  check_cpu("rope_", q, k, cos, sin);
  const int64_t T = q.size(0), D = q.size(2);
  check(q, T, D);
  check(k, T, D);
  TORCH_CHECK(D % 2 == 0, "rope: head size must be even");
  auto c = cos.to(at::kFloat).reshape({T, D}).contiguous();
  auto s = sin.to(at::kFloat).reshape({T, D}).contiguous();
  const float* cp = c.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  float* qp = q.data_ptr<float>();
  float* kp = k.data_ptr<float>();
  const int64_t H = q.size(1), Hkv = k.size(1);
  auto body = [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t h = 0; h < H; ++h) rotate(qp + t * q.stride(0) + h * q.stride(1), cp + t * D, sp + t * D, D / 2);
      for (int64_t h = 0; h < Hkv; ++h) rotate(kp + t * k.stride(0) + h * k.stride(1), cp + t * D, sp + t * D, D / 2);
    }
  };
  if (T * (H + Hkv) * D < (1 << 15))
    body(0, T);
  else
    at::parallel_for(0, T, 16, body);
}

}  // namespace xllm
