// Skinny matrix products for decode: out[M, N] = x[M, K] @ w[N, K]^T (+ bias), M small (1..64).
//
// Stock torch streams a weight matrix through a matrix-vector product at well under the memory
// bandwidth on CPUs (PERF_NOTES.md). Here each thread takes a contiguous band of output rows and
// reads every weight once, doing the M dot products for a row from one load of it; AVX2/FMA where
// the compiler targets it, a plain loop otherwise. Weights in float32 or bfloat16 (widened to
// float32 in registers); accumulation is float32. The pure-torch path (F.linear) stays the
// reference and the fallback (xllm/ops/cpu_kernels.py).
#include "common.h"

namespace xllm {
namespace {

// Output tile [MR x R]: activation rows m0..m0+MR against weight rows n..n+R, over all of K.
template <typename W, int MR, int R>
inline void tile(const float* x, const W* w, int64_t K, int64_t N, int64_t m0, int64_t n, const float* bias,
                 float* out) {
  const float* xm = x + m0 * K;
  float acc_s[MR][R];
  int64_t k = 0;
#ifdef XLLM_AVX2
  __m256 acc[MR][R];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  // The first tile of a band prefetches the next band's rows (same offsets), so their loads are
  // in flight during this band's compute: the hardware prefetcher alone leaves the bus idle.
  const bool prefetch = m0 == 0 && n + 2 * R <= N;
  for (; k + 8 <= K; k += 8) {
    __m256 wv[R];
    for (int r = 0; r < R; ++r) {
      if (prefetch && (k * sizeof(W)) % 64 == 0)
        _mm_prefetch(reinterpret_cast<const char*>(w + (n + R + r) * K + k), _MM_HINT_T0);
      wv[r] = load8(w + (n + r) * K + k);
    }
    for (int m = 0; m < MR; ++m) {
      __m256 xv = _mm256_loadu_ps(xm + m * K + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < R; ++r) acc_s[m][r] = hsum(acc[m][r]);
#else
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < R; ++r) acc_s[m][r] = 0.f;
#endif
  for (; k < K; ++k)
    for (int r = 0; r < R; ++r) {
      float wk = widen(w[(n + r) * K + k]);
      for (int m = 0; m < MR; ++m) acc_s[m][r] += xm[m * K + k] * wk;
    }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < R; ++r) out[(m0 + m) * N + n + r] = acc_s[m][r] + (bias ? bias[n + r] : 0.f);
}

// All M activation rows against weight rows n..n+R: tiles of MR rows while the R weight rows stay
// in L1, then the M remainder with a smaller tile.
template <typename W, int MR, int R>
inline void band(const float* x, const W* w, int64_t M, int64_t K, int64_t N, int64_t n, const float* bias,
                 float* out) {
  int64_t m = 0;
  for (; m + MR <= M; m += MR) tile<W, MR, R>(x, w, K, N, m, n, bias, out);
  switch (M - m) {
    case 3: if constexpr (MR > 3) tile<W, 3, R>(x, w, K, N, m, n, bias, out); break;
    case 2: if constexpr (MR > 2) tile<W, 2, R>(x, w, K, N, m, n, bias, out); break;
    case 1: if constexpr (MR > 1) tile<W, 1, R>(x, w, K, N, m, n, bias, out); break;
    default: break;
  }
}

template <typename W, int MR, int R>
void run(const float* x, const W* w, int64_t M, int64_t K, int64_t N, const float* bias, float* out) {
  const int64_t groups = N / R;
  // Bands of at least ~64 KiB of weights, so the split costs little against the streaming.
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / (R * K * int64_t(sizeof(W))));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) band<W, MR, R>(x, w, M, K, N, g * R, bias, out);
  });
  for (int64_t n = groups * R; n < N; ++n) band<W, MR, 1>(x, w, M, K, N, n, bias, out);
}

template <typename W>
void gemv_dispatch(const float* x, const W* w, int64_t M, int64_t K, int64_t N, const float* bias, float* out) {
  // M <= 2 is bandwidth-bound: four weight streams. Larger M is compute-bound: 4 x 3 tiles
  // (12 accumulators, 3 weight vectors and 1 activation vector: the 16 AVX2 registers).
  switch (M) {
    case 1: return run<W, 1, 4>(x, w, M, K, N, bias, out);
    case 2: return run<W, 2, 4>(x, w, M, K, N, bias, out);
    default: return run<W, 4, 3>(x, w, M, K, N, bias, out);
  }
}

}  // namespace

// x [M, K] (any float dtype), w [N, K] float32 or bfloat16 contiguous, bias [N] or empty.
// Returns [M, N] float32.
at::Tensor gemv(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  check_cpu("gemv", x, w, bias);
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "gemv: shapes");
  TORCH_CHECK(w.is_contiguous(), "gemv: weight must be contiguous");
  auto xf = x.to(at::kFloat).contiguous();
  const int64_t M = xf.size(0), K = xf.size(1), N = w.size(0);
  auto out = at::empty({M, N}, xf.options());
  at::Tensor bf;
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    bf = bias->to(at::kFloat).contiguous();
    bp = bf.data_ptr<float>();
  }
  if (w.scalar_type() == at::kFloat)
    gemv_dispatch(xf.data_ptr<float>(), w.data_ptr<float>(), M, K, N, bp, out.data_ptr<float>());
  else if (w.scalar_type() == at::kBFloat16)
    gemv_dispatch(xf.data_ptr<float>(), w.data_ptr<at::BFloat16>(), M, K, N, bp, out.data_ptr<float>());
  else
    TORCH_CHECK(false, "gemv: weight dtype must be float32 or bfloat16");
  return out;
}

}  // namespace xllm
