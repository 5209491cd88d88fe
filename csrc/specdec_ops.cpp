// specdec operators: schemas (defined once, here) and the CPU implementations.
//
//   tree_attention(q [B, Hq, n, D], k [B, Hkv, S, D], v [B, Hkv, S, D], ancestors [n, W] int64,
//                  prefix_len, scale) -> [B, n, Hq, D]
//     Query i (tree slot i; slot 0 is the root) attends to every prefix key (key index <
//     prefix_len) and to tree slot j (key index prefix_len + j) iff bit j of ancestors[i] is set
//     (bit j of the packed row = word j / 64, bit j % 64). S == prefix_len + n. Grouped-query
//     heads share K/V rows without expansion (query head h reads kv head h / (Hq / Hkv)).
//
//   tree_attention_rows(q [B, Hq, n, D], k [R, Hkv, S, D], v [R, Hkv, S, D], ancestors [B, n, W] int64,
//                       lengths [B] int64, scale) -> [B, n, Hq, D]     (R >= B: rows past B are not read)
//     The same for rows of different prefix lengths in one call: row b's query i attends to keys
//     [0, lengths[b]) and to key lengths[b] + j iff bit j of ancestors[b, i] is set; keys from
//     lengths[b] + n on (other rows' slots, unwritten cache) are never seen. S >= lengths[b] + n.
//     bf16 / fp16 with at most 24 query rows per kv head (G * n) on an AVX-512 build: the direct
//     kernel (`direct::`); otherwise float32 GEMMs over every row at once.
//
//   kv_write(keys [R', H, C, D], values [R', H, C, D], key_states [R, H, q, D], value_states, offsets [R] int64)
//     In place (R' >= R): row r's q new slots go to positions offsets[r] .. offsets[r] + q - 1 (one memcpy of D
//     per slot and head; no index tensor, no scatter).
//
//   kv_compact(keys[], values[], prefix_len, keep [m] int64) -> ()
//     For every [B, H, S, D] cache tensor, in place: row prefix_len + i <- row prefix_len + keep[i]
//     (keep strictly increasing, so rows only move towards the prefix). The caller narrows the
//     tensors to prefix_len + m afterwards.
//
//   packed_linear(x [rows, in], packed, bias [out]?, out_features) -> [rows, out_features]
//     x @ W.T + bias with W prepacked by mkldnn::_reorder_linear_weight: oneDNN's own
//     mkldnn::_linear_pointwise, called from C++ (a Python custom op around it cost ~16 us a call,
//     about 2.5 ms of a one-row SmolLM2 forward of 211 linear layers).

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#endif

namespace specdec {

namespace {

inline bool sees_slot(const uint64_t* ancestors_row, int64_t slot) {
  return (ancestors_row[slot >> 6] >> (slot & 63)) & 1ULL;
}

// Blocks the tree keys each query row may not see: scores [B, Hkv, G * n, prefix_len + n] float32,
// row r is tree slot r % n. Only the last n columns are touched; the prefix stays visible.
void mask_tree_keys(at::Tensor& scores, const at::Tensor& ancestors, int64_t prefix_len, int64_t n) {
  const int64_t rows = scores.numel() / scores.size(-1), seq = scores.size(-1), words = ancestors.size(1);
  float* data = scores.data_ptr<float>();
  const uint64_t* anc = reinterpret_cast<const uint64_t*>(ancestors.data_ptr<int64_t>());
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const uint64_t* anc_row = anc + (row % n) * words;
      float* tree_scores = data + row * seq + prefix_len;
      for (int64_t slot = 0; slot < n; ++slot) {
        if (!sees_slot(anc_row, slot)) tree_scores[slot] = kNegInf;
      }
    }
  });
}

void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": q, k, v must be 4-D [B, H, len, D]");
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v shapes differ");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              op, ": q, k, v must share a dtype");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3), op, ": batch or head_dim mismatch");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              op, ": query heads (", q.size(1), ") must be a multiple of kv heads (", k.size(1), ")");
}

// Scores of q [B, Hq, n, D] against every key as one float32 GEMM per (batch, kv head), grouped-query
// heads viewed as rows ([B, Hkv, G * n, S]; row r is tree slot r % n); `mask` blocks keys in place;
// then softmax and the GEMM with V. Returns [B, n, Hq, D] in q's dtype.
template <typename Mask>
at::Tensor masked_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, Mask mask) {
  const int64_t batch = q.size(0), q_heads = q.size(1), n = q.size(2), d = q.size(3), kv_heads = k.size(1);
  if (q.numel() == 0) return at::empty({batch, n, q_heads, d}, q.options());
  const auto queries = (q.to(at::kFloat) * scale).reshape({batch, kv_heads, q_heads / kv_heads * n, d});
  auto scores = at::matmul(queries, k.to(at::kFloat).transpose(-1, -2)).contiguous();  // [B, Hkv, G*n, S]
  mask(scores);
  const auto probs = at::_softmax(scores, -1, false);
  const auto out = at::matmul(probs, v.to(at::kFloat));  // [B, Hkv, G*n, D]
  return out.reshape({batch, q_heads, n, d}).transpose(1, 2).to(q.scalar_type()).contiguous();  // [B, n, Hq, D]
}

void check_tree_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& ancestors, int64_t prefix_len) {
  check_qkv("tree_attention", q, k, v);
  TORCH_CHECK(prefix_len >= 0 && k.size(2) == prefix_len + q.size(2),
              "tree_attention: keys must hold prefix_len + n positions, got ", k.size(2), " for prefix_len ",
              prefix_len, " and n ", q.size(2));
  TORCH_CHECK(ancestors.scalar_type() == at::kLong && ancestors.dim() == 2 && ancestors.size(0) == q.size(2) &&
                  ancestors.size(1) * 64 >= q.size(2),
              "tree_attention: ancestors must be int64 [n, ceil(n / 64)]");
}

// Grouped-query heads become rows: q [B, Hq, n, D] is viewed as [B, Hkv, G * n, D] (query head
// h = kv head h / G), so each kv head's K/V is read once and never expanded. Scores come from one
// float32 GEMM over all S keys, the tree part is masked in place from the ancestor bits (no [n, S]
// mask exists), then softmax and a second GEMM with V.
at::Tensor tree_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& ancestors, int64_t prefix_len, double scale) {
  check_tree_attention_args(q, k, v, ancestors, prefix_len);
  const auto ancestors_c = ancestors.contiguous();
  return masked_attention(q, k, v, scale, [&](at::Tensor& scores) {
    mask_tree_keys(scores, ancestors_c, prefix_len, q.size(2));
  });
}

// Row b's tree part of scores [B, Hkv, G * n, S] float32: the slots row r % n may not see, and
// every key past the row's own slots. The prefix [0, lengths[b]) stays visible.
void mask_row_tree_keys(at::Tensor& scores, const at::Tensor& ancestors, const int64_t* lengths, int64_t n) {
  const int64_t batch = scores.size(0), seq = scores.size(-1), words = ancestors.size(2);
  const int64_t rows_per_batch = scores.numel() / batch / seq;
  float* data = scores.data_ptr<float>();
  const uint64_t* anc = reinterpret_cast<const uint64_t*>(ancestors.data_ptr<int64_t>());
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, batch * rows_per_batch, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / rows_per_batch;
      const uint64_t* anc_row = anc + (b * n + row % n) * words;
      float* tree_scores = data + row * seq + lengths[b];
      for (int64_t slot = 0; slot < n; ++slot) {
        if (!sees_slot(anc_row, slot)) tree_scores[slot] = kNegInf;
      }
      std::fill(tree_scores + n, data + (row + 1) * seq, kNegInf);
    }
  });
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
// Direct kernel for batched verify steps (AVX-512): each (row, kv head) reads only its own keys
// and values (never padded to the longest row), once, converted to float32 in registers; no
// float32 copy of the cache is made, and the whole call is one parallel region (`attend_rows`).
namespace direct {

// The query rows per kv head (G * n) up to which this kernel is used. Measured against the float32
// GEMMs (bf16, G = 3, 300-1,200 keys): one row 2.3-3.1x faster at 3 query rows, 1.1-1.2x at 24,
// 0.77-0.96x at 48; eight rows 4.7x at 3, 4x at 24, 2.3x at 48 (the GEMMs convert every row's keys,
// padded to the longest row's, to float32 on each call).
constexpr int64_t kMaxRows = 24;

inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  const __m256i raw = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 load16(const c10::Half* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }

// `count` rows of `d` elements (`stride` apart) as float32 rows of `C` * 16 (zero past d).
template <int C, typename T>
void to_float(const T* src, int64_t stride, int64_t count, int64_t d, float* dst) {
  for (int64_t i = 0; i < count; ++i) {
    for (int c = 0; c < C; ++c) {
      const int64_t left = d - c * 16;
      const __mmask16 m = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
      _mm512_storeu_ps(dst + (i * C + c) * 16, load16(src + i * stride + c * 16, m));
    }
  }
}

// Sixteen vectors -> one: lane l holds the sum of the lanes of acc[l].
inline __m512 reduce16(const __m512* acc) {
  __m512 pairs[8], quads[4];
  for (int i = 0; i < 8; ++i)
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(acc[2 * i], acc[2 * i + 1]), _mm512_unpackhi_ps(acc[2 * i], acc[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    quads[i] = _mm512_add_ps(_mm512_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(pairs[2 * i], pairs[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 low = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(quads[0], quads[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 high = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_f32x4(quads[2], quads[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(low, high, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(low, high, _MM_SHUFFLE(3, 1, 3, 1)));
}

// scores[r, j] = query[r] . key[j] for `rows` queries and `count` keys (float32, C * 16 wide).
template <int C>
void score_block(const float* query, int64_t rows, const float* key, int64_t count, float* scores, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    __m512 q[C];
    for (int c = 0; c < C; ++c) q[c] = _mm512_loadu_ps(query + (r * C + c) * 16);
    int64_t j = 0;
    for (; j + 16 <= count; j += 16) {
      __m512 acc[16];
      for (int l = 0; l < 16; ++l) {
        acc[l] = _mm512_mul_ps(q[0], _mm512_loadu_ps(key + ((j + l) * C) * 16));
        for (int c = 1; c < C; ++c) acc[l] = _mm512_fmadd_ps(q[c], _mm512_loadu_ps(key + ((j + l) * C + c) * 16), acc[l]);
      }
      _mm512_storeu_ps(scores + r * ld + j, reduce16(acc));
    }
    for (; j < count; ++j) {
      __m512 acc = _mm512_mul_ps(q[0], _mm512_loadu_ps(key + (j * C) * 16));
      for (int c = 1; c < C; ++c) acc = _mm512_fmadd_ps(q[c], _mm512_loadu_ps(key + (j * C + c) * 16), acc);
      scores[r * ld + j] = _mm512_reduce_add_ps(acc);
    }
  }
}

// out[r] = sum_j probs[r, j] value[j] for `rows` query rows, kBlock of them in registers at a time.
template <int C>
void weigh_values(const float* probs, int64_t ld, int64_t rows, const float* value, int64_t count, float* out) {
  constexpr int kBlock = std::clamp(16 / C, 2, 4);  // rows whose C accumulators fit in registers
  for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
    const int block = static_cast<int>(std::min<int64_t>(kBlock, rows - r0));
    __m512 acc[kBlock][C];
    for (int b = 0; b < kBlock; ++b)
      for (int c = 0; c < C; ++c) acc[b][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < count; ++j) {
      for (int b = 0; b < block; ++b) {
        const __m512 w = _mm512_set1_ps(probs[(r0 + b) * ld + j]);
        for (int c = 0; c < C; ++c) acc[b][c] = _mm512_fmadd_ps(w, _mm512_loadu_ps(value + (j * C + c) * 16), acc[b][c]);
      }
    }
    for (int b = 0; b < block; ++b)
      for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + ((r0 + b) * C + c) * 16, acc[b][c]);
  }
}

// Runs `work(unit)` for every unit in [0, units) on the intra-op threads, each taking the next
// unit as it finishes one (items differ in length: a static split would leave a thread idle).
template <typename F>
void for_each_unit(int64_t units, const F& work) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), units), 1, [&](int64_t, int64_t) {
    for (int64_t unit = next++; unit < units; unit = next++) work(unit);
  });
}

// exp(x) lane by lane (Cephes' polynomial after a power-of-two range reduction, ~1 ulp); lanes
// below -87.3 (masked keys: -inf) are exactly 0.
inline __m512 exp16(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_GE_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
}

// In place over `count` scores: s <- exp(s - max); returns (max, sum) (max -inf: all masked, all 0;
// a NaN or +inf score makes both NaN, so that the output is NaN as the softmax's would be).
inline std::pair<float, float> exponentiate(float* s, int64_t count) {
  __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __mmask16 invalid = 0;
  for (int64_t j = 0; j < count; j += 16) {
    const __mmask16 m = count - j >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (count - j)) - 1u);
    const __m512 x = _mm512_maskz_loadu_ps(m, s + j);
    invalid |= _mm512_mask_cmp_ps_mask(m, x, x, _CMP_UNORD_Q);
    top = _mm512_mask_max_ps(top, m, top, x);
  }
  const float most = _mm512_reduce_max_ps(top);
  if (invalid || most == std::numeric_limits<float>::infinity()) {
    return {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::quiet_NaN()};
  }
  if (most == -std::numeric_limits<float>::infinity()) {
    std::fill(s, s + count, 0.0f);
    return {most, 0.0f};
  }
  __m512 total = _mm512_setzero_ps();
  for (int64_t j = 0; j < count; j += 16) {
    const __mmask16 m = count - j >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (count - j)) - 1u);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), _mm512_set1_ps(most)));
    _mm512_mask_storeu_ps(s + j, m, e);
    total = _mm512_add_ps(total, _mm512_maskz_mov_ps(m, e));
  }
  return {most, _mm512_reduce_add_ps(total)};
}

// Split-key attention in ONE parallel region: a work unit is (row b, kv head h, up to 128 of the
// row's visible keys), taken dynamically by the threads (rows differ in length). A unit scores
// its keys for the G * n query rows of its kv head, exponentiates against its own maximum and
// weighs its values; the last unit of an item to finish rescales the item's partial sums to the
// common maximum and writes the output.
template <int C, typename T>
at::Tensor attend_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& ancestors,
                       const int64_t* lengths, double scale) {
  const int64_t batch = q.size(0), q_heads = q.size(1), n = q.size(2), d = q.size(3), kv_heads = k.size(1);
  const int64_t group = q_heads / kv_heads, rows = group * n, words = ancestors.size(2);
  constexpr int64_t kWidth = C * 16, kChunk = 128;
  const int64_t items = batch * kv_heads;
  std::vector<int64_t> first_unit(items + 1, 0);  // item i's units: [first_unit[i], first_unit[i + 1])
  for (int64_t item = 0; item < items; ++item) {
    first_unit[item + 1] = first_unit[item] + (lengths[item / kv_heads] + n + kChunk - 1) / kChunk;
  }
  const int64_t units = first_unit[items];
  auto out = at::empty({batch, n, q_heads, d}, q.options());
  // Every unit writes all of its rows' partial sums, maxima and totals: no zero fill needed.
  std::unique_ptr<float[]> partial(new float[units * rows * kWidth]), top(new float[units * rows]),
      total(new float[units * rows]);
  std::unique_ptr<std::atomic<int64_t>[]> finished(new std::atomic<int64_t>[items]);
  for (int64_t item = 0; item < items; ++item) finished[item].store(0, std::memory_order_relaxed);
  const uint64_t* anc = reinterpret_cast<const uint64_t*>(ancestors.data_ptr<int64_t>());
  const T* q_data = q.data_ptr<T>();
  const T* k_data = k.data_ptr<T>();
  const T* v_data = v.data_ptr<T>();
  T* out_data = out.data_ptr<T>();
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  auto combine = [&](int64_t item) {
    const int64_t b = item / kv_heads, h = item % kv_heads, u0 = first_unit[item], u1 = first_unit[item + 1];
    for (int64_t r = 0; r < rows; ++r) {
      float most = kNegInf;
      for (int64_t u = u0; u < u1; ++u) most = std::max(most, top[u * rows + r]);
      __m512 acc[C];
      for (int c = 0; c < C; ++c) acc[c] = _mm512_setzero_ps();
      float sum = 0.0f;
      for (int64_t u = u0; u < u1; ++u) {
        if (total[u * rows + r] == 0.0f) continue;
        const float w = std::exp(top[u * rows + r] - most);
        sum += w * total[u * rows + r];
        for (int c = 0; c < C; ++c)
          acc[c] = _mm512_fmadd_ps(_mm512_set1_ps(w), _mm512_loadu_ps(partial.get() + (u * rows + r) * kWidth + c * 16), acc[c]);
      }
      alignas(64) float row[kWidth];
      for (int c = 0; c < C; ++c) _mm512_store_ps(row + c * 16, _mm512_div_ps(acc[c], _mm512_set1_ps(sum)));
      T* dst = out_data + ((b * n + r % n) * q_heads + h * group + r / n) * d;
      for (int64_t e = 0; e < d; ++e) dst[e] = static_cast<T>(row[e]);
    }
  };
  for_each_unit(units, [&](int64_t unit) {
    thread_local std::vector<float> query, keys, scores;
    query.resize(rows * kWidth);
    keys.resize(kChunk * kWidth);
    scores.resize(rows * kChunk);
    const int64_t item = std::upper_bound(first_unit.begin(), first_unit.end(), unit) - first_unit.begin() - 1;
    const int64_t b = item / kv_heads, h = item % kv_heads, length = lengths[b];
    const int64_t j0 = (unit - first_unit[item]) * kChunk, j1 = std::min(j0 + kChunk, length + n), count = j1 - j0;
    for (int64_t r = 0; r < rows; ++r) {  // row r: query head h * G + r / n at slot r % n
      to_float<C>(q_data + b * q.stride(0) + (h * group + r / n) * q.stride(1) + (r % n) * q.stride(2), 0, 1, d,
                  query.data() + r * kWidth);
    }
    for (float& x : query) x *= static_cast<float>(scale);
    to_float<C>(k_data + b * k.stride(0) + h * k.stride(1) + j0 * k.stride(2), k.stride(2), count, d, keys.data());
    score_block<C>(query.data(), rows, keys.data(), count, scores.data(), kChunk);
    for (int64_t r = 0; r < rows; ++r) {
      const uint64_t* anc_row = anc + (b * n + r % n) * words;
      for (int64_t j = std::max(j0, length); j < j1; ++j) {  // the tree slots row r may not see
        if (!sees_slot(anc_row, j - length)) scores[r * kChunk + j - j0] = kNegInf;
      }
      const auto [most, sum] = exponentiate(scores.data() + r * kChunk, count);
      top[unit * rows + r] = most;
      total[unit * rows + r] = sum;
    }
    to_float<C>(v_data + b * v.stride(0) + h * v.stride(1) + j0 * v.stride(2), v.stride(2), count, d, keys.data());
    weigh_values<C>(scores.data(), kChunk, rows, keys.data(), count, partial.get() + unit * rows * kWidth);
    if (finished[item].fetch_add(1, std::memory_order_acq_rel) + 1 == first_unit[item + 1] - first_unit[item]) {
      combine(item);
    }
  });
  return out;
}

template <typename T>
at::Tensor attend_rows_for(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& ancestors,
                           const int64_t* lengths, double scale) {
  switch ((q.size(3) + 15) / 16) {
    case 1: return attend_rows<1, T>(q, k, v, ancestors, lengths, scale);
    case 2: return attend_rows<2, T>(q, k, v, ancestors, lengths, scale);
    case 3: return attend_rows<3, T>(q, k, v, ancestors, lengths, scale);
    case 4: return attend_rows<4, T>(q, k, v, ancestors, lengths, scale);
    case 5: return attend_rows<5, T>(q, k, v, ancestors, lengths, scale);
    case 6: return attend_rows<6, T>(q, k, v, ancestors, lengths, scale);
    case 7: return attend_rows<7, T>(q, k, v, ancestors, lengths, scale);
    default: return attend_rows<8, T>(q, k, v, ancestors, lengths, scale);
  }
}

}  // namespace direct
#endif

// One call for every row: the float32 GEMMs run batched over (row, kv head) as in tree_attention,
// and only the mask knows each row's own prefix length.
at::Tensor tree_attention_rows_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& ancestors, const at::Tensor& lengths, double scale) {
  const int64_t batch = q.size(0), n = q.size(2), seq = k.size(2);
  TORCH_CHECK(k.dim() == 4 && k.size(0) >= batch, "tree_attention_rows: k, v must be 4-D with at least ", batch,
              " rows");
  check_qkv("tree_attention_rows", q, k.narrow(0, 0, batch), v.narrow(0, 0, batch));
  TORCH_CHECK(ancestors.scalar_type() == at::kLong && ancestors.dim() == 3 && ancestors.size(0) == batch &&
                  ancestors.size(1) == n && ancestors.size(2) * 64 >= n,
              "tree_attention_rows: ancestors must be int64 [B, n, ceil(n / 64)]");
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.dim() == 1 && lengths.size(0) == batch &&
                  lengths.device().is_cpu(),
              "tree_attention_rows: lengths must be a CPU int64 [B] tensor");
  const auto lengths_c = lengths.contiguous();
  const int64_t* lengths_ptr = lengths_c.data_ptr<int64_t>();
  int64_t longest = 0;
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(lengths_ptr[b] >= 0 && lengths_ptr[b] + n <= seq, "tree_attention_rows: row ", b, "'s length ",
                lengths_ptr[b], " plus ", n, " slots passes the ", seq, " keys");
    longest = std::max(longest, lengths_ptr[b]);
  }
  const auto ancestors_c = ancestors.contiguous();
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  const bool reduced = q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf;
  if (reduced && n > 0 && q.size(3) > 0 && q.size(1) / k.size(1) * n <= direct::kMaxRows && q.stride(3) == 1 &&
      k.stride(3) == 1 && v.stride(3) == 1 && q.size(3) <= 128) {
    return q.scalar_type() == at::kBFloat16
               ? direct::attend_rows_for<c10::BFloat16>(q, k, v, ancestors_c, lengths_ptr, scale)
               : direct::attend_rows_for<c10::Half>(q, k, v, ancestors_c, lengths_ptr, scale);
  }
#endif
  // Keys past the longest row's slots are never seen: a caller may pass whole cache buffers.
  const auto seen_k = k.narrow(0, 0, batch).narrow(2, 0, longest + n);
  const auto seen_v = v.narrow(0, 0, batch).narrow(2, 0, longest + n);
  return masked_attention(q, seen_k, seen_v, scale, [&](at::Tensor& scores) {
    mask_row_tree_keys(scores, ancestors_c, lengths_ptr, n);
  });
}


void kv_write_cpu(at::Tensor keys, at::Tensor values, const at::Tensor& key_states, const at::Tensor& value_states,
                  const at::Tensor& offsets) {
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.device().is_cpu(),
              "kv_write: offsets must be a CPU int64 [R] tensor");
  const at::Tensor* caches[2] = {&keys, &values};
  const at::Tensor* states[2] = {&key_states, &value_states};
  const int64_t rows = offsets.size(0), queries = key_states.dim() == 4 ? key_states.size(2) : 0;
  for (int pair = 0; pair < 2; ++pair) {
    const at::Tensor &cache = *caches[pair], &state = *states[pair];
    TORCH_CHECK(cache.dim() == 4 && state.dim() == 4 && cache.stride(3) == 1 && state.stride(3) == 1,
                "kv_write: cache and states must be [R, H, len, D] with unit last stride");
    TORCH_CHECK(cache.scalar_type() == state.scalar_type(), "kv_write: cache and states must share a dtype");
    TORCH_CHECK(cache.size(0) >= rows && state.size(0) == rows && cache.size(1) == state.size(1) &&
                    cache.size(3) == state.size(3) && state.size(2) == queries,
                "kv_write: cache ", cache.sizes(), " and states ", state.sizes(), " do not match ", rows, " rows");
  }
  const auto offsets_c = offsets.contiguous();
  const int64_t* offset = offsets_c.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(offset[r] >= 0 && offset[r] + queries <= keys.size(2), "kv_write: row ", r, "'s slots ", offset[r],
                " .. ", offset[r] + queries - 1, " pass the cache's ", keys.size(2), " positions");
  }
  const int64_t heads = keys.size(1);
  at::parallel_for(0, 2 * rows * heads, 8, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int pair = static_cast<int>(item / (rows * heads));
      const int64_t r = item / heads % rows, h = item % heads;
      const at::Tensor &cache = *caches[pair], &state = *states[pair];
      const int64_t size = cache.element_size(), bytes = cache.size(3) * size;
      char* target = static_cast<char*>(cache.data_ptr()) + (r * cache.stride(0) + h * cache.stride(1)) * size;
      const char* source =
          static_cast<const char*>(state.data_ptr()) + (r * state.stride(0) + h * state.stride(1)) * size;
      for (int64_t i = 0; i < queries; ++i) {
        std::memcpy(target + (offset[r] + i) * cache.stride(2) * size, source + i * state.stride(2) * size, bytes);
      }
    }
  });
}

void kv_compact_cpu(at::TensorList keys, at::TensorList values, int64_t prefix_len, const at::Tensor& keep) {
  TORCH_CHECK(keys.size() == values.size(), "kv_compact: as many key as value tensors expected");
  TORCH_CHECK(keep.scalar_type() == at::kLong && keep.dim() == 1, "kv_compact: keep must be a 1-D int64 tensor");
  const auto keep_c = keep.contiguous();
  const int64_t* keep_ptr = keep_c.data_ptr<int64_t>();
  const int64_t m = keep_c.numel();
  for (int64_t i = 0; i < m; ++i) {
    TORCH_CHECK(keep_ptr[i] >= i && (i == 0 || keep_ptr[i] > keep_ptr[i - 1]),
                "kv_compact: keep must be strictly increasing and non-negative");
  }
  std::vector<at::Tensor> tensors(keys.begin(), keys.end());
  tensors.insert(tensors.end(), values.begin(), values.end());
  for (const auto& t : tensors) {
    TORCH_CHECK(t.dim() == 4 && t.stride(3) == 1, "kv_compact: cache tensors must be [B, H, S, D] with unit last stride");
    TORCH_CHECK(m == 0 || prefix_len + keep_ptr[m - 1] < t.size(2), "kv_compact: keep index out of range");
  }
  // Work items: (tensor, batch, head) rows of S x D, each moved independently.
  std::vector<int64_t> offsets{0};
  for (const auto& t : tensors) offsets.push_back(offsets.back() + t.size(0) * t.size(1));
  at::parallel_for(0, offsets.back(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t which = std::upper_bound(offsets.begin(), offsets.end(), item) - offsets.begin() - 1;
      const at::Tensor& t = tensors[which];
      const int64_t local = item - offsets[which];
      const int64_t b = local / t.size(1), h = local % t.size(1);
      const int64_t row_bytes = t.size(3) * t.element_size();
      char* base = static_cast<char*>(t.data_ptr()) + (b * t.stride(0) + h * t.stride(1)) * t.element_size();
      const int64_t row_stride = t.stride(2) * t.element_size();
      for (int64_t i = 0; i < m; ++i) {
        if (keep_ptr[i] == i) continue;
        std::memcpy(base + (prefix_len + i) * row_stride, base + (prefix_len + keep_ptr[i]) * row_stride, row_bytes);
      }
    }
  });
}

at::Tensor packed_linear_cpu(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                             int64_t out_features) {
  static const auto linear =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view,
                            c10::List<std::optional<at::Scalar>>, std::optional<c10::string_view>)>();
  TORCH_CHECK(x.dim() == 2, "packed_linear: x must be [rows, in_features]");
  at::Tensor out = linear.call(x, packed, bias, "none", c10::List<std::optional<at::Scalar>>(), "");
  TORCH_CHECK(out.size(-1) == out_features, "packed_linear: the packed weight gives ", out.size(-1),
              " outputs, expected ", out_features);
  return out;
}

}  // namespace

TORCH_LIBRARY(specdec, m) {
  m.def("tree_attention(Tensor q, Tensor k, Tensor v, Tensor ancestors, int prefix_len, float scale) -> Tensor");
  m.def("tree_attention_rows(Tensor q, Tensor k, Tensor v, Tensor ancestors, Tensor lengths, float scale) -> Tensor");
  m.def("kv_write(Tensor(a!) keys, Tensor(b!) values, Tensor key_states, Tensor value_states, Tensor offsets) -> ()");
  m.def("kv_compact(Tensor(a!)[] keys, Tensor(b!)[] values, int prefix_len, Tensor keep) -> ()");
  m.def("packed_linear(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(specdec, CPU, m) {
  m.impl("tree_attention", &tree_attention_cpu);
  m.impl("tree_attention_rows", &tree_attention_rows_cpu);
  m.impl("kv_write", &kv_write_cpu);
  m.impl("kv_compact", &kv_compact_cpu);
  m.impl("packed_linear", &packed_linear_cpu);
}

TORCH_LIBRARY_IMPL(specdec, MkldnnCPU, m) {  // a packed bf16 weight is an opaque oneDNN tensor
  m.impl("packed_linear", &packed_linear_cpu);
}

}  // namespace specdec
