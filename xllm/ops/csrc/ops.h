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

std::tuple<at::Tensor, at::Tensor> decode_layer(
    const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& ln1, const at::Tensor& qkv_w,
    const c10::optional<at::Tensor>& qkv_b, const at::Tensor& o_w, const at::Tensor& ln2, const at::Tensor& gate_up_w,
    const at::Tensor& down_w, const at::Tensor& cos, const at::Tensor& sin, at::Tensor kv_cache,
    const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& slots, int64_t num_heads,
    int64_t num_kv_heads, double eps, double scale);

std::tuple<at::Tensor, at::Tensor> decode_attn(
    const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& ln1, const at::Tensor& qkv_w,
    const c10::optional<at::Tensor>& qkv_b, const at::Tensor& o_w, const at::Tensor& cos, const at::Tensor& sin,
    at::Tensor kv_cache, const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& slots,
    int64_t num_heads, int64_t num_kv_heads, double eps, double scale);

std::tuple<at::Tensor, at::Tensor> decode_mlp(const at::Tensor& o, const at::Tensor& residual, const at::Tensor& ln2,
                                              const at::Tensor& gate_up_w, const at::Tensor& down_w, double eps);

}  // namespace xllm
