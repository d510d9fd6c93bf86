// Decode attention straight from the KV cache: one query token per sequence, no gather.
//
// Paged layout: kv_cache [2, num_blocks, block_size, Hkv, D] (K then V, float32 or bfloat16);
// block_tables [B, max_blocks] int64. xtensor layout: k_ranges / v_ranges [slots, pages, block_size,
// Hkv, D], strided views of the per-sequence virtual ranges (xllm/kv/xtensor.py), slots [B] int64.
// Both: seq_lens [B] int64 (tokens in the cache, the new one included); q [B, H, D]. The G = H / Hkv query heads that share a KV head are scored together, so each key
// and value vector is read once; the next rows are prefetched while earlier ones are processed. Scores,
// softmax (vectorized exp) and the weighted sum are float32. The torch reference is xllm/ops/attention.py (gather + SDPA).
#include "common.h"
#include "ops.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace xllm {
namespace {

// out[g * stride] = scale * <q_g, k> for the G query vectors q_g = q + g * D: each chunk of the key
// is loaded once for all G queries.
template <typename T>
inline void dots(const float* q, int64_t G, const T* k, int64_t D, float scale, float* out, int64_t stride) {
#ifdef XLLM_AVX2
  if (G <= 8 && D % 8 == 0) {
    __m256 acc[8];
    for (int64_t g = 0; g < G; ++g) acc[g] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 kv = load8(k + d);
      for (int64_t g = 0; g < G; ++g) acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * D + d), kv, acc[g]);
    }
    for (int64_t g = 0; g < G; ++g) out[g * stride] = hsum(acc[g]) * scale;
    return;
  }
#endif
  for (int64_t g = 0; g < G; ++g) out[g * stride] = dot(q + g * D, k, D) * scale;
}

// out_g += p[g * stride] * v for the G outputs out_g = out + g * D: v loaded once for all of them.
template <typename T>
inline void axpys(const float* p, int64_t stride, int64_t G, const T* v, float* out, int64_t D) {
#ifdef XLLM_AVX2
  if (G <= 8 && D % 8 == 0) {
    __m256 pv[8];
    for (int64_t g = 0; g < G; ++g) pv[g] = _mm256_set1_ps(p[g * stride]);
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 vv = load8(v + d);
      for (int64_t g = 0; g < G; ++g) {
        float* o = out + g * D + d;
        _mm256_storeu_ps(o, _mm256_fmadd_ps(pv[g], vv, _mm256_loadu_ps(o)));
      }
    }
    return;
  }
#endif
  for (int64_t g = 0; g < G; ++g) axpy(p[g * stride], v, out + g * D, D);
}

// Prefetch one block's rows (the next block of the sequence) while the current one is processed.
template <typename T>
inline void prefetch_block(const T* p, int64_t bytes) {
#ifdef XLLM_AVX2
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(c + off, _MM_HINT_T0);
#endif
}

// Where token t of sequence b sits (element offset from the K or V base), for the two layouts.
struct PagedRows {  // paged: block table, blocks of BS tokens; a block's rows are contiguous
  const int64_t* tables;
  int64_t max_blocks, BS, block_stride, tok_stride;
  int64_t row(int64_t b, int64_t t) const { return tables[b * max_blocks + t / BS] * block_stride + (t % BS) * tok_stride; }
};
struct RangeRows {  // xtensor: each sequence its own range of pages, in order; no table
  const int64_t* slots;
  int64_t slot_stride, page_stride, BS, tok_stride;
  int64_t row(int64_t b, int64_t t) const { return slots[b] * slot_stride + (t / BS) * page_stride + (t % BS) * tok_stride; }
};

template <typename T, typename Rows>
void decode(const float* q, const T* kc, const T* vc, const Rows& rows_of, const int64_t* lens, int64_t B, int64_t H,
            int64_t Hkv, int64_t D, float scale, float* out) {
  const int64_t G = H / Hkv;
  constexpr int64_t kAhead = 16;  // tokens between prefetches, and how far ahead they reach
  // An item is (sequence, range of KV heads). With a sequence per item, each token's K/V row of all
  // heads is read contiguously; with fewer sequences than threads, items split the heads so every
  // thread has work.
  const int64_t split = B >= at::get_num_threads() ? 1 : Hkv;
  const int64_t heads_per_item = Hkv / split;
  auto prefetch = [&](const T* base, int64_t b, int64_t t, int64_t L, int64_t h0, int64_t span) {
    if (t % kAhead || t + kAhead >= L) return;
    if (span == Hkv * D * int64_t(sizeof(T)) && rows_of.BS % kAhead == 0) {  // the next rows are one run of memory
      prefetch_block(base + rows_of.row(b, t + kAhead), kAhead * span);
      return;
    }
    for (int64_t u = t + kAhead; u < std::min(L, t + 2 * kAhead); ++u) prefetch_block(base + rows_of.row(b, u) + h0 * D, span);
  };
  auto item = [&](int64_t i, std::vector<float>& scores) {
    const int64_t b = i / split, h0 = (i % split) * heads_per_item, nh = heads_per_item, L = lens[b];
    const int64_t span = nh * D * int64_t(sizeof(T));
    scores.resize(nh * G * L);  // [head, g, t]
    for (int64_t t = 0; t < L; ++t) {
      prefetch(kc, b, t, L, h0, span);
      const T* kp = kc + rows_of.row(b, t) + h0 * D;
      for (int64_t h = 0; h < nh; ++h) dots(q + (b * H + (h0 + h) * G) * D, G, kp + h * D, D, scale, scores.data() + h * G * L + t, L);
    }
    float* ob = out + (b * H + h0 * G) * D;
    float inv_sum[512];
    for (int64_t j = 0; j < nh * G; ++j) inv_sum[j] = 1.f / exp_shift_sum(scores.data() + j * L, L);
    std::fill(ob, ob + nh * G * D, 0.f);
    for (int64_t t = 0; t < L; ++t) {
      prefetch(vc, b, t, L, h0, span);
      const T* vp = vc + rows_of.row(b, t) + h0 * D;
      for (int64_t h = 0; h < nh; ++h) axpys(scores.data() + h * G * L + t, L, G, vp + h * D, ob + h * G * D, D);
    }
    for (int64_t j = 0; j < nh * G; ++j)
      for (int64_t d = 0; d < D; ++d) ob[j * D + d] *= inv_sum[j];
  };
  int64_t work = 0;
  for (int64_t b = 0; b < B; ++b) work += lens[b];
  work *= H * D;
  if (work < (1 << 17)) {  // a few microseconds: not worth waking the other threads
    std::vector<float> scores;
    for (int64_t i = 0; i < B * split; ++i) item(i, scores);
    return;
  }
  at::parallel_for(0, B * split, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores;
    for (int64_t i = i0; i < i1; ++i) item(i, scores);
  });
}

template <typename Rows>
at::Tensor run_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Rows& rows_of,
                      const at::Tensor& lens, int64_t Hkv, double scale, const char* name) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  auto qf = q.to(at::kFloat).contiguous();
  auto out = at::empty({B, H, D}, qf.options());
  const int64_t* lp = lens.data_ptr<int64_t>();
  if (k.scalar_type() == at::kFloat) {
    decode(qf.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), rows_of, lp, B, H, Hkv, D, float(scale),
           out.data_ptr<float>());
  } else if (k.scalar_type() == at::kBFloat16) {
    decode(qf.data_ptr<float>(), k.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>(), rows_of, lp, B, H, Hkv, D,
           float(scale), out.data_ptr<float>());
  } else {
    TORCH_CHECK(false, name, ": cache dtype must be float32 or bfloat16");
  }
  return out;
}

}  // namespace

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_tables,
                                  const at::Tensor& seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && kv_cache.dim() == 5 && kv_cache.size(0) == 2, "paged_decode_attention: shapes");
  TORCH_CHECK(kv_cache.is_contiguous(), "paged_decode_attention: cache must be contiguous");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t NB = kv_cache.size(1), BS = kv_cache.size(2), Hkv = kv_cache.size(3);
  TORCH_CHECK(kv_cache.size(4) == D && H % Hkv == 0 && H <= 512, "paged_decode_attention: heads");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == B && seq_lens.numel() == B,
              "paged_decode_attention: tables");
  auto tables = block_tables.to(at::kLong).contiguous();
  auto lens = seq_lens.to(at::kLong).contiguous();
  const int64_t max_blocks = tables.size(1);
  const int64_t* lp = lens.data_ptr<int64_t>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= max_blocks * BS, "paged_decode_attention: seq_len out of range");
    for (int64_t j = 0; j < (lp[b] + BS - 1) / BS; ++j)
      TORCH_CHECK(tp[b * max_blocks + j] >= 0 && tp[b * max_blocks + j] < NB, "paged_decode_attention: block id");
  }
  const PagedRows rows_of{tp, max_blocks, BS, BS * Hkv * D, Hkv * D};
  return run_decode(q, kv_cache[0], kv_cache[1], rows_of, lens, Hkv, scale, "paged_decode_attention");
}

at::Tensor range_decode_attention(const at::Tensor& q, const at::Tensor& k_ranges, const at::Tensor& v_ranges,
                                  const at::Tensor& slots, const at::Tensor& seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_ranges.dim() == 5 && v_ranges.dim() == 5, "range_decode_attention: shapes");
  TORCH_CHECK(k_ranges.sizes() == v_ranges.sizes() && k_ranges.strides() == v_ranges.strides() &&
                  k_ranges.scalar_type() == v_ranges.scalar_type(),
              "range_decode_attention: K and V ranges must match");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t S = k_ranges.size(0), BS = k_ranges.size(2), Hkv = k_ranges.size(3);
  const int64_t maxlen = k_ranges.size(1) * BS;
  TORCH_CHECK(k_ranges.size(4) == D && H % Hkv == 0 && H <= 512, "range_decode_attention: heads");
  TORCH_CHECK(k_ranges.stride(4) == 1 && k_ranges.stride(3) == D && k_ranges.stride(2) == Hkv * D,
              "range_decode_attention: a page's rows must be contiguous");
  TORCH_CHECK(slots.numel() == B && seq_lens.numel() == B, "range_decode_attention: slots and lengths");
  auto sl = slots.to(at::kLong).contiguous();
  auto lens = seq_lens.to(at::kLong).contiguous();
  const int64_t* lp = lens.data_ptr<int64_t>();
  const int64_t* sp = sl.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= maxlen, "range_decode_attention: seq_len out of range");
    TORCH_CHECK(sp[b] >= 0 && sp[b] < S, "range_decode_attention: slot out of range");
  }
  const RangeRows rows_of{sp, k_ranges.stride(0), k_ranges.stride(1), BS, k_ranges.stride(2)};
  return run_decode(q, k_ranges, v_ranges, rows_of, lens, Hkv, scale, "range_decode_attention");
}

}  // namespace xllm
