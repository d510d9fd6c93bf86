// The kernels' entry points, bound to Python in bindings.cpp.
#pragma once

#include <ATen/ATen.h>

namespace xllm {

at::Tensor gemv(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias);

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_tables,
                                  const at::Tensor& seq_lens, double scale);

at::Tensor range_decode_attention(const at::Tensor& q, const at::Tensor& k_ranges, const at::Tensor& v_ranges,
                                  const at::Tensor& slots, const at::Tensor& seq_lens, double scale);

std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                            const at::Tensor& weight, double eps);

at::Tensor silu_mul(const at::Tensor& x);

at::Tensor argmax_rows(const at::Tensor& x);

void rope_(at::Tensor& q, at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin);

void write_kv(at::Tensor& cache, const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots);

}  // namespace xllm
