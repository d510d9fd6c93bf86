// One Llama-family decoder layer for a batch of decodes (one new token per sequence, M rows), in
// one call: the Python glue between the kernels cost ~100 us a layer at batch 1, about an eighth
// of the step. It chains the same kernels the module path calls one by one (RMSNorm with the
// residual add, the skinny matmul, rotary embedding, the K/V write, paged decode attention,
// silu * up), so its results are those of that path, which stays the reference (xllm/models/llama.py).
//
// x [M, hidden] float32; residual [M, hidden] float32 or none (first layer); the norm weights in
// float32; the matmul weights as the modules hold them ([N, K] float32 or bfloat16, contiguous);
// cos/sin [M, 1, D] for the step's positions; kv_cache [2, num_blocks, block_size, Hkv, D]
// (paged, contiguous, float32 or bfloat16), block_tables [M, max_blocks], seq_lens [M] (the new
// token included), slots [M] (where the new K/V rows go). Returns (out, residual), float32.
//
// A bfloat16 model runs here with float32 activations over its bfloat16 weights and cache, as
// llama.cpp runs BF16 weights: only the K/V rows are rounded, when they are written. The module
// path rounds every activation to bfloat16, so the two agree to bfloat16 rounding, not bit for bit.
#include "common.h"
#include "ops.h"

namespace xllm {

// The layer's attention half: (the residual add and) the input norm, q/k/v, rotary, the K/V write,
// paged attention and o_proj. Returns (o, residual). Under tensor parallelism `o` is this rank's
// partial sum over its heads: it is all-reduced before `decode_mlp`.
std::tuple<at::Tensor, at::Tensor> decode_attn(
    const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& ln1, const at::Tensor& qkv_w,
    const c10::optional<at::Tensor>& qkv_b, const at::Tensor& o_w, const at::Tensor& cos, const at::Tensor& sin,
    at::Tensor kv_cache, const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& slots,
    int64_t num_heads, int64_t num_kv_heads, double eps, double scale) {
  check_cpu("decode_attn", x, residual, ln1, qkv_w, qkv_b, o_w, cos, sin, kv_cache, block_tables, seq_lens, slots);
  const int64_t M = x.size(0), H = num_heads, Hkv = num_kv_heads;
  const int64_t D = qkv_w.size(0) / (H + 2 * Hkv);
  TORCH_CHECK(x.dim() == 2 && qkv_w.size(0) == (H + 2 * Hkv) * D && o_w.size(1) == H * D, "decode_attn: shapes");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "decode_attn: float32 activations");
  at::Tensor h, res;
  if (residual.has_value() && residual->defined()) {
    std::tie(h, res) = rms_norm(x, residual, ln1, eps);
  } else {
    res = x;
    h = std::get<0>(rms_norm(x, c10::nullopt, ln1, eps));
  }
  const at::Tensor qkv = gemv(h, qkv_w, qkv_b);  // [M, (H + 2 Hkv) D]
  at::Tensor q = qkv.narrow(1, 0, H * D).view({M, H, D});
  at::Tensor k = qkv.narrow(1, H * D, Hkv * D).view({M, Hkv, D});
  const at::Tensor v = qkv.narrow(1, (H + Hkv) * D, Hkv * D).view({M, Hkv, D});
  rope_(q, k, cos, sin);
  write_kv(kv_cache, k.to(kv_cache.scalar_type()), v.to(kv_cache.scalar_type()), slots);  // no copy in float32
  const at::Tensor attn = paged_decode_attention(q, kv_cache, block_tables, seq_lens, scale);
  return {gemv(attn.view({M, H * D}), o_w, c10::nullopt), res};
}

// The MLP half: the residual add and post-attention norm, gate/up, silu * up, down. Returns
// (out, residual); under tensor parallelism `out` is a partial sum, all-reduced after.
std::tuple<at::Tensor, at::Tensor> decode_mlp(const at::Tensor& o, const at::Tensor& residual, const at::Tensor& ln2,
                                              const at::Tensor& gate_up_w, const at::Tensor& down_w, double eps) {
  check_cpu("decode_mlp", o, residual, ln2, gate_up_w, down_w);
  TORCH_CHECK(o.dim() == 2 && o.scalar_type() == at::kFloat, "decode_mlp: float32 [M, hidden] activations");
  at::Tensor h, res;
  std::tie(h, res) = rms_norm(o, residual, ln2, eps);
  return {gemv(silu_mul(gemv(h, gate_up_w, c10::nullopt)), down_w, c10::nullopt), res};
}

std::tuple<at::Tensor, at::Tensor> decode_layer(
    const at::Tensor& x, const c10::optional<at::Tensor>& residual, const at::Tensor& ln1, const at::Tensor& qkv_w,
    const c10::optional<at::Tensor>& qkv_b, const at::Tensor& o_w, const at::Tensor& ln2, const at::Tensor& gate_up_w,
    const at::Tensor& down_w, const at::Tensor& cos, const at::Tensor& sin, at::Tensor kv_cache,
    const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& slots, int64_t num_heads,
    int64_t num_kv_heads, double eps, double scale) {
  at::Tensor o, res;
  std::tie(o, res) = decode_attn(x, residual, ln1, qkv_w, qkv_b, o_w, cos, sin, kv_cache, block_tables, seq_lens,
                                 slots, num_heads, num_kv_heads, eps, scale);
  return decode_mlp(o, res, ln2, gate_up_w, down_w, eps);
}

}  // namespace xllm
