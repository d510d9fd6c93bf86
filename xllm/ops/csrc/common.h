// Helpers shared by the CPU kernels: AVX2 loads that widen bfloat16 to float32, horizontal sums.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define XLLM_AVX2 1
#endif

namespace xllm {

// The kernels read host memory: every tensor they are handed must live on the CPU (a CUDA or meta
// tensor's pointer is not one they can follow). The Python dispatchers send others to torch first.
inline bool on_cpu(const at::Tensor& t) { return t.device().is_cpu(); }
inline bool on_cpu(const c10::optional<at::Tensor>& t) { return !t.has_value() || t->device().is_cpu(); }
template <typename... Ts>
inline void check_cpu(const char* name, const Ts&... ts) {
  TORCH_CHECK((on_cpu(ts) && ...), name, ": the CPU kernels take CPU tensors only");
}

#ifdef XLLM_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
#endif

// fn(r) for every row r < rows: on the calling thread, or split over torch's threads when `parallel`.
template <typename F>
inline void for_each_row(int64_t rows, bool parallel, const F& fn) {
  if (!parallel) {
    for (int64_t r = 0; r < rows; ++r) fn(r);
    return;
  }
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) fn(r);
  });
}

inline float widen(float v) { return v; }
inline float widen(at::BFloat16 v) { return static_cast<float>(v); }


#ifdef XLLM_AVX2
// exp of 8 floats (Cephes' expf: Cody-Waite range reduction, degree-5 polynomial), relative
// error ~1e-7 over [-87, 88]; inputs are clamped to that range.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

// In place: s[i] = exp(s[i] - max(s)); returns the sum.
inline float exp_shift_sum(float* s, int64_t n) {
  float mx = -INFINITY;
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, s[i]);
  int64_t i = 0;
  float sum = 0.f;
#ifdef XLLM_AVX2
  const __m256 m = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), m));
    _mm256_storeu_ps(s + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = hsum(acc);
#endif
  for (; i < n; ++i) sum += (s[i] = std::exp(s[i] - mx));
  return sum;
}

// Dot product of n floats (a) with n weights (b), float32 accumulation.
template <typename W>
inline float dot(const float* a, const W* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#ifdef XLLM_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), load8(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc0);
  s = hsum(_mm256_add_ps(acc0, acc1));
#endif
  for (; i < n; ++i) s += a[i] * widen(b[i]);
  return s;
}

// y[0:n] += alpha * x[0:n]
template <typename W>
inline void axpy(float alpha, const W* x, float* y, int64_t n) {
  int64_t i = 0;
#ifdef XLLM_AVX2
  const __m256 av = _mm256_set1_ps(alpha);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, load8(x + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += alpha * widen(x[i]);
}

}  // namespace xllm
