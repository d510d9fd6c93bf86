// A step's new K/V rows into one layer's cache, in one call (the torch path takes two index_copy_
// through fresh views, which at batch 1 cost more than the copy).
//
// cache [2, num_blocks, block_size, Hkv, D]: the paged tensor, or the xtensor pool's per-layer
// view, whose blocks are pages apart (any strides, as long as a token's Hkv * D values are
// contiguous). k, v [T, Hkv, D]: may be row-strided views of the fused q/k/v projection output.
// slots [T] int64: block * block_size + offset. The torch reference is write_kv in
// xllm/ops/attention.py.
#include <cstring>

#include "common.h"
#include "ops.h"

namespace xllm {

void write_kv(at::Tensor& cache, const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots) {
  check_cpu("write_kv", cache, k, v, slots);
  TORCH_CHECK(cache.dim() == 5 && cache.size(0) == 2 && k.dim() == 3 && v.sizes() == k.sizes(), "write_kv: shapes");
  const int64_t NB = cache.size(1), BS = cache.size(2), Hkv = cache.size(3), D = cache.size(4), T = k.size(0);
  TORCH_CHECK(k.size(1) == Hkv && k.size(2) == D && slots.numel() == T && slots.scalar_type() == at::kLong,
              "write_kv: rows and slots");
  TORCH_CHECK(k.scalar_type() == cache.scalar_type() && v.scalar_type() == cache.scalar_type(), "write_kv: dtypes");
  TORCH_CHECK(cache.stride(4) == 1 && cache.stride(3) == D && k.stride(2) == 1 && k.stride(1) == D &&
                  v.stride(2) == 1 && v.stride(1) == D,
              "write_kv: a token's values must be contiguous");
  auto sl = slots.contiguous();
  const int64_t* sp = sl.data_ptr<int64_t>();
  const int64_t elem = cache.element_size(), row = Hkv * D * elem;
  char* base = static_cast<char*>(cache.data_ptr());
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  const int64_t kv_off = cache.stride(0) * elem, blk = cache.stride(1) * elem, tok = cache.stride(2) * elem;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t s = sp[t];
    TORCH_CHECK(s >= 0 && s < NB * BS, "write_kv: slot out of range");
    char* dst = base + (s / BS) * blk + (s % BS) * tok;
    std::memcpy(dst, kp + t * k.stride(0) * elem, row);
    std::memcpy(dst + kv_off, vp + t * v.stride(0) * elem, row);
  }
}

}  // namespace xllm
