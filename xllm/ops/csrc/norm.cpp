// RMSNorm with the residual add fused in, float32: one pass per row instead of five torch ops.
//
// With a residual: s = x + residual (returned as the new residual), out = weight * s / rms(s).
// Same operation order as transformers' LlamaRMSNorm in float32: s * rsqrt(mean(s^2) + eps),
// then times the weight. The torch reference is xllm/layers/norm.py.
#include "common.h"
#include "ops.h"

#include <cmath>

namespace xllm {

std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                            const at::Tensor& weight, double eps) {
  check_cpu("rms_norm", x, residual, weight);
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "rms_norm: float32 only");
  const int64_t N = weight.numel();
  TORCH_CHECK(x.size(-1) == N, "rms_norm: hidden size");
  auto xc = x.contiguous();
  const bool has_res = residual.has_value() && residual->defined();
  at::Tensor res_in, res_out;
  if (has_res) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == at::kFloat, "rms_norm: residual");
    res_in = residual->contiguous();
    res_out = at::empty_like(xc);
  }
  auto out = at::empty_like(xc);
  auto wc = weight.contiguous();
  const int64_t rows = xc.numel() / N;
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  const float* rp = has_res ? res_in.data_ptr<float>() : nullptr;
  float* sp = has_res ? res_out.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / N), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = xp + r * N;
      const float* s = xr;
      if (has_res) {
        float* sr = sp + r * N;
        for (int64_t i = 0; i < N; ++i) sr[i] = xr[i] + rp[r * N + i];
        s = sr;
      }
      const float ms = dot(s, s, N) / float(N);
      const float inv = 1.f / std::sqrt(ms + float(eps));
      float* o = op + r * N;
      for (int64_t i = 0; i < N; ++i) o[i] = wp[i] * (s[i] * inv);
    }
  });
  return {out, has_res ? res_out : at::Tensor()};
}

}  // namespace xllm
