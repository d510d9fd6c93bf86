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

#ifdef XLLM_AVX2
// s[g * L + j] = scale * <q_g, k_j> for four keys k_j = k + j * stride (j < 4) and GN queries q_g =
// q + g * D: 4 * GN independent accumulators (the FMA latency is hidden), reduced four at a time.
template <int GN, typename T>
inline void scores4(const float* q, const T* k, int64_t stride, int64_t D, float scale, float* s, int64_t L) {
  __m256 acc[GN][4];
  for (int g = 0; g < GN; ++g)
    for (int j = 0; j < 4; ++j) acc[g][j] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    __m256 kv[4];
    for (int j = 0; j < 4; ++j) kv[j] = load8(k + j * stride + d);
    for (int g = 0; g < GN; ++g) {
      const __m256 qv = _mm256_loadu_ps(q + g * D + d);
      for (int j = 0; j < 4; ++j) acc[g][j] = _mm256_fmadd_ps(qv, kv[j], acc[g][j]);
    }
  }
  const __m128 sc = _mm_set1_ps(scale);
  for (int g = 0; g < GN; ++g) {
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(acc[g][0], acc[g][1]), _mm256_hadd_ps(acc[g][2], acc[g][3]));
    _mm_storeu_ps(s + g * L, _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)), sc));
  }
}

// acc[g][c] += p[g * L + i] * v_i[8c : 8c + 8] over the n rows v_i = v + i * stride (32 floats each).
template <int GN, typename T>
inline void weighted_rows(const float* p, int64_t L, const T* v, int64_t stride, int64_t n, __m256 (&acc)[GN][4]) {
  for (int64_t i = 0; i < n; ++i) {
    const T* vr = v + i * stride;
    const __m256 v0 = load8(vr), v1 = load8(vr + 8), v2 = load8(vr + 16), v3 = load8(vr + 24);
    for (int g = 0; g < GN; ++g) {
      const __m256 pg = _mm256_set1_ps(p[g * L + i]);
      acc[g][0] = _mm256_fmadd_ps(pg, v0, acc[g][0]);
      acc[g][1] = _mm256_fmadd_ps(pg, v1, acc[g][1]);
      acc[g][2] = _mm256_fmadd_ps(pg, v2, acc[g][2]);
      acc[g][3] = _mm256_fmadd_ps(pg, v3, acc[g][3]);
    }
  }
}
#endif

// Prefetch n rows of `bytes` each, `stride` elements apart (the next block, for the heads of an item).
template <typename T>
inline void prefetch_rows(const T* p, int64_t n, int64_t stride, int64_t bytes) {
  for (int64_t i = 0; i < n; ++i) prefetch_block(p + i * stride, bytes);
}

// The KV heads h0 .. h0 + nh - 1 of one sequence (hoff = h0 * D), each attended by the G query heads
// that share it: q [nh, G, D] -> out [nh, G, D]. Block-major: each block's rows are read once for all
// nh heads (contiguous when nh = Hkv) and the next block is prefetched, instead of one pass per head
// over 256 bytes of every 768-byte row (12-17% faster at 4-64 sequences, benchmarks/attention.py).
// Scores: four keys x three query heads at a time. Weighted sums: 3 heads x 32 dimensions in registers over a block, kept in
// `acc` [nh, G, D] between blocks. s is scratch of nh * G * L floats. AVX2 for D a multiple of 32,
// plain loops otherwise.
template <typename T, typename Rows>
void attend_heads(const float* q, int64_t G, int64_t nh, const T* kc, const T* vc, const Rows& rows, int64_t b,
                  int64_t L, int64_t hoff, int64_t D, float scale, float* s, float* acc, float* out) {
  const int64_t BS = rows.BS, ts = rows.tok_stride, bytes = nh * D * int64_t(sizeof(T)), GL = G * L;
  [[maybe_unused]] const bool fast = D % 32 == 0;
  for (int64_t t0 = 0; t0 < L; t0 += BS) {  // scores
    const T* blk = kc + rows.row(b, t0) + hoff;
    const int64_t n = std::min(BS, L - t0);
    if (t0 + BS < L) prefetch_rows(kc + rows.row(b, t0 + BS) + hoff, std::min(BS, L - t0 - BS), ts, bytes);
    for (int64_t h = 0; h < nh; ++h) {
      const float* qh = q + h * G * D;
      const T* bh = blk + h * D;
      float* sh = s + h * GL + t0;
      int64_t i = 0;
#ifdef XLLM_AVX2
      if (fast)
        for (; i + 4 <= n; i += 4)
          for (int64_t g0 = 0; g0 < G; g0 += 3) {
            float* sg = sh + g0 * L + i;
            switch (std::min<int64_t>(3, G - g0)) {
              case 3: scores4<3>(qh + g0 * D, bh + i * ts, ts, D, scale, sg, L); break;
              case 2: scores4<2>(qh + g0 * D, bh + i * ts, ts, D, scale, sg, L); break;
              default: scores4<1>(qh + g0 * D, bh + i * ts, ts, D, scale, sg, L); break;
            }
          }
#endif
      for (; i < n; ++i) dots(qh, G, bh + i * ts, D, scale, sh + i, L);
    }
  }
  for (int64_t r = 0; r < nh * G; ++r) out[r * D] = 1.f / exp_shift_sum(s + r * L, L);  // parked in out
  std::fill(acc, acc + nh * G * D, 0.f);
  for (int64_t t0 = 0; t0 < L; t0 += BS) {  // weighted sums of the values
    const T* blk = vc + rows.row(b, t0) + hoff;
    const int64_t n = std::min(BS, L - t0);
    if (t0 + BS < L) prefetch_rows(vc + rows.row(b, t0 + BS) + hoff, std::min(BS, L - t0 - BS), ts, bytes);
    for (int64_t h = 0; h < nh; ++h) {
      const T* bh = blk + h * D;
      const float* ph = s + h * GL + t0;
      float* ah = acc + h * G * D;
#ifdef XLLM_AVX2
      if (fast) {
        for (int64_t g0 = 0; g0 < G; g0 += 3) {
          const int64_t gn = std::min<int64_t>(3, G - g0);
          for (int64_t d0 = 0; d0 < D; d0 += 32) {
            float* a = ah + g0 * D + d0;
            __m256 r[3][4];
            for (int64_t g = 0; g < gn; ++g)
              for (int c = 0; c < 4; ++c) r[g][c] = _mm256_loadu_ps(a + g * D + 8 * c);
            if (gn == 3) {
              weighted_rows<3>(ph + g0 * L, L, bh + d0, ts, n, r);
            } else if (gn == 2) {
              weighted_rows<2>(ph + g0 * L, L, bh + d0, ts, n, reinterpret_cast<__m256(&)[2][4]>(r));
            } else {
              weighted_rows<1>(ph + g0 * L, L, bh + d0, ts, n, reinterpret_cast<__m256(&)[1][4]>(r));
            }
            for (int64_t g = 0; g < gn; ++g)
              for (int c = 0; c < 4; ++c) _mm256_storeu_ps(a + g * D + 8 * c, r[g][c]);
          }
        }
        continue;
      }
#endif
      for (int64_t i = 0; i < n; ++i) axpys(ph + i, L, G, bh + i * ts, ah, D);
    }
  }
  for (int64_t r = 0; r < nh * G; ++r) {
    const float inv = out[r * D];
    for (int64_t d = 0; d < D; ++d) out[r * D + d] = acc[r * D + d] * inv;
  }
}

template <typename T, typename Rows>
void decode(const float* q, const T* kc, const T* vc, const Rows& rows_of, const int64_t* lens, int64_t B, int64_t H,
            int64_t Hkv, int64_t D, float scale, float* out) {
  const int64_t G = H / Hkv;
  // An item is (sequence, range of KV heads). With fewer sequences than threads, items split the
  // heads so that every thread has work.
  const int64_t split = B >= at::get_num_threads() ? 1 : Hkv;
  const int64_t heads_per_item = Hkv / split;
  auto item = [&](int64_t i, std::vector<float>& scratch) {
    const int64_t b = i / split, h0 = (i % split) * heads_per_item, L = lens[b];
    scratch.resize(heads_per_item * G * (L + D));
    attend_heads(q + (b * H + h0 * G) * D, G, heads_per_item, kc, vc, rows_of, b, L, h0 * D, D, scale, scratch.data(),
                 scratch.data() + heads_per_item * G * L, out + (b * H + h0 * G) * D);
  };
  int64_t work = 0;
  for (int64_t b = 0; b < B; ++b) work += lens[b];
  work *= H * D;
  if (work < (1 << 17)) {  // a few microseconds: not worth waking the other threads
    std::vector<float> scratch;
    for (int64_t i = 0; i < B * split; ++i) item(i, scratch);
    return;
  }
  at::parallel_for(0, B * split, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scratch;
    for (int64_t i = i0; i < i1; ++i) item(i, scratch);
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
  check_cpu("paged_decode_attention", q, kv_cache, block_tables, seq_lens);
  TORCH_CHECK(q.dim() == 3 && kv_cache.dim() == 5 && kv_cache.size(0) == 2, "paged_decode_attention: shapes");
  TORCH_CHECK(kv_cache.is_contiguous(), "paged_decode_attention: cache must be contiguous");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t NB = kv_cache.size(1), BS = kv_cache.size(2), Hkv = kv_cache.size(3);
  TORCH_CHECK(kv_cache.size(4) == D && H % Hkv == 0, "paged_decode_attention: heads");
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
  check_cpu("range_decode_attention", q, k_ranges, v_ranges, slots, seq_lens);
  TORCH_CHECK(q.dim() == 3 && k_ranges.dim() == 5 && v_ranges.dim() == 5, "range_decode_attention: shapes");
  TORCH_CHECK(k_ranges.sizes() == v_ranges.sizes() && k_ranges.strides() == v_ranges.strides() &&
                  k_ranges.scalar_type() == v_ranges.scalar_type(),
              "range_decode_attention: K and V ranges must match");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t S = k_ranges.size(0), BS = k_ranges.size(2), Hkv = k_ranges.size(3);
  const int64_t maxlen = k_ranges.size(1) * BS;
  TORCH_CHECK(k_ranges.size(4) == D && H % Hkv == 0, "range_decode_attention: heads");
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
