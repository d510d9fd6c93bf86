// Python bindings of the CPU kernels (loaded by xllm/ops/cpu_kernels.py).
#include <torch/extension.h>

#include "ops.h"

static bool has_avx2() {
#if defined(__AVX2__) && defined(__FMA__)
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &xllm::gemv, "out[M,N] = x[M,K] @ w[N,K]^T (+bias), float32 result");
  m.def("paged_decode_attention", &xllm::paged_decode_attention,
        "decode attention read from the paged KV cache: q [B,H,D] -> [B,H,D] float32");
  m.def("range_decode_attention", &xllm::range_decode_attention,
        "decode attention read from per-sequence strided ranges (xtensor): q [B,H,D] -> [B,H,D] float32");
  m.def("rms_norm", &xllm::rms_norm, "RMSNorm of x (+ residual), float32: (out, new residual or None)");
  m.def("rope_", &xllm::rope_, "rotary embedding in place on q [T,H,D] and k [T,Hkv,D], float32");
  m.def("silu_mul", &xllm::silu_mul, "silu(x[:, :I]) * x[:, I:] for x [M, 2I] float32");
  m.def("argmax_rows", &xllm::argmax_rows, "first index of each row's maximum, x [M, V] float32 -> [M] int64");
  m.def("write_kv", &xllm::write_kv, "new K/V rows [T,Hkv,D] into a layer's cache [2,NB,BS,Hkv,D] at slots [T]");
  m.def("decode_layer", &xllm::decode_layer,
        "one Llama decoder layer for a decode-only batch, the kernels chained: (out, residual)");
  m.def("decode_attn", &xllm::decode_attn,
        "a decode layer's attention half, up to o_proj (a partial sum under tensor parallelism): (o, residual)");
  m.def("decode_mlp", &xllm::decode_mlp,
        "a decode layer's MLP half, from the post-attention norm to down_proj: (out, residual)");
  m.def("has_avx2", &has_avx2);
}
