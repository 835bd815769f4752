// jaxmap's CPU decode attention: one new query per row against the KV cache, called from XLA through the FFI.
//
// Why: in XLA, a decode step's attention is about 17 small ops per layer (read the cache bucket, scores, mask, cap,
// softmax, weighted sum of values, the new key's term); at a few microseconds of dispatch each they cost a quantized
// model's decode a quarter of its time. Here one call does it all, reading the layer's keys and values in place from
// the (stacked) cache, and skipping the slots the mask hides instead of scoring and masking them.
//
// Inputs (what jaxmap.engine.blocks.attention computes for decode): q [b, g, r, k] (float32; r query heads share each
// of the g key/value heads), the caches [layers?, b, g, S, k] (float32 or bfloat16; `layer` picks the entry of a
// stack), mask [b, read] (which of the first `read` slots this row's query sees), the new key and value [b, g, k]
// (float32; the query always sees them) and optional sinks [g, r] (gpt-oss: one more logit in each denominator).
// Scores are (q . key) * scale, soft-capped as cap * tanh(s / cap) when cap > 0; the result is the softmax-weighted
// sum of the values [b, g, r, k], in float32.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include <immintrin.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// A cache row (one slot's key or value) as float32: in place for float32, converted into `tmp` for bfloat16.
template <typename T>
inline const float* slot_as_float(const T* row, int64_t k, float* tmp);
template <>
inline const float* slot_as_float<float>(const float* row, int64_t, float*) {
  return row;
}
template <>
inline const float* slot_as_float<uint16_t>(const uint16_t* row, int64_t k, float* tmp) {
  for (int64_t i = 0; i < k; ++i) tmp[i] = bf16_to_float(row[i]);
  return tmp;
}

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float total = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  total = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  total = _mm_cvtss_f32(x);
#endif
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

// out += w * v over n floats
inline void axpy(float* out, float w, const float* v, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 wv = _mm512_set1_ps(w);
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(out + i, _mm512_fmadd_ps(wv, _mm512_loadu_ps(v + i), _mm512_loadu_ps(out + i)));
#elif defined(__AVX2__) && defined(__FMA__)
  const __m256 wv = _mm256_set1_ps(w);
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_fmadd_ps(wv, _mm256_loadu_ps(v + i), _mm256_loadu_ps(out + i)));
#endif
  for (; i < n; ++i) out[i] += w * v[i];
}

struct Problem {
  const float* q = nullptr;  // [b, g, r, k]
  const void* kc = nullptr;  // one layer's cache [b, g, S, k]
  const void* vc = nullptr;
  const bool* mask = nullptr;  // [b, read]
  const float* knew = nullptr;  // [b, g, k]
  const float* vnew = nullptr;
  const float* sinks = nullptr;  // [g, r] or null
  float* out = nullptr;  // [b, g, r, k]
  int64_t b = 0, g = 0, r = 0, k = 0, slots = 0, read = 0;
  float scale = 1.f, softcap = 0.f;
};

// One (row, key/value head) pair: its r queries against the slots the mask shows and the new key.
template <typename T>
void one_head(const Problem& p, int64_t bi, int64_t gi, std::vector<float>& scores, std::vector<int32_t>& seen,
              std::vector<float>& tmp) {
  const int64_t r = p.r, k = p.k;
  const T* keys = static_cast<const T*>(p.kc) + (bi * p.g + gi) * p.slots * k;
  const T* values = static_cast<const T*>(p.vc) + (bi * p.g + gi) * p.slots * k;
  const bool* mask = p.mask + bi * p.read;
  const float* q = p.q + (bi * p.g + gi) * r * k;
  const float* knew = p.knew + (bi * p.g + gi) * k;
  const float* vnew = p.vnew + (bi * p.g + gi) * k;
  float* out = p.out + (bi * p.g + gi) * r * k;
  seen.clear();
  for (int64_t s = 0; s < p.read; ++s)
    if (mask[s]) seen.push_back(static_cast<int32_t>(s));
  const int64_t n = static_cast<int64_t>(seen.size()) + 1;  // the seen slots, then the new key
  scores.resize(r * n);
  tmp.resize(k);
  auto cap = [&](float s) { return p.softcap > 0.f ? p.softcap * std::tanh(s / p.softcap) : s; };
  for (int64_t j = 0; j + 1 < n; ++j) {
    const float* key = slot_as_float<T>(keys + seen[j] * k, k, tmp.data());
    for (int64_t h = 0; h < r; ++h) scores[h * n + j] = cap(dot(q + h * k, key, k) * p.scale);
  }
  for (int64_t h = 0; h < r; ++h) scores[h * n + n - 1] = cap(dot(q + h * k, knew, k) * p.scale);
  for (int64_t h = 0; h < r; ++h) {  // softmax over the row, a sink joining the denominator only
    float* sc = scores.data() + h * n;
    float top = *std::max_element(sc, sc + n);
    const float sink = p.sinks ? p.sinks[gi * r + h] : 0.f;
    if (p.sinks) top = std::max(top, sink);
    float total = p.sinks ? std::exp(sink - top) : 0.f;
    for (int64_t j = 0; j < n; ++j) {
      sc[j] = std::exp(sc[j] - top);
      total += sc[j];
    }
    const float inv = 1.f / total;
    for (int64_t j = 0; j < n; ++j) sc[j] *= inv;
    std::fill(out + h * k, out + (h + 1) * k, 0.f);
  }
  for (int64_t j = 0; j + 1 < n; ++j) {
    const float* value = slot_as_float<T>(values + seen[j] * k, k, tmp.data());
    for (int64_t h = 0; h < r; ++h) axpy(out + h * k, scores[h * n + j], value, k);
  }
  for (int64_t h = 0; h < r; ++h) axpy(out + h * k, scores[h * n + n - 1], vnew, k);
}

// (row, head) pairs shared by the calling thread and the pool's helpers, taken in turn (as qmatvec.cc's Work).
struct Work {
  Problem problem;
  bool bf16 = false;
  int64_t n_items = 0;
  std::atomic<int64_t> next{0}, done{0};

  void run() {
    std::vector<float> scores, tmp;
    std::vector<int32_t> seen;
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n_items;) {
      const int64_t bi = i / problem.g, gi = i % problem.g;
      if (bf16)
        one_head<uint16_t>(problem, bi, gi, scores, seen, tmp);
      else
        one_head<float>(problem, bi, gi, scores, seen, tmp);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S32> layer,
                           ffi::AnyBuffer kc, ffi::AnyBuffer vc, ffi::Buffer<ffi::PRED> mask,
                           ffi::Buffer<ffi::F32> knew, ffi::Buffer<ffi::F32> vnew, ffi::Buffer<ffi::F32> sinks,
                           ffi::Result<ffi::Buffer<ffi::F32>> out, float scale, float softcap, int64_t layers) {
  auto work = std::make_shared<Work>();
  Problem& p = work->problem;
  const auto qd = q.dimensions(), cd = kc.dimensions(), md = mask.dimensions();
  if (qd.size() != 4 || md.size() != 2) return ffi::Error::InvalidArgument("decode attention: q [b, g, r, k], mask [b, n]");
  p.b = qd[0];
  p.g = qd[1];
  p.r = qd[2];
  p.k = qd[3];
  p.read = md[1];
  const size_t stacked = layers > 1 || cd.size() == 5 ? 1 : 0;
  if (cd.size() != 4 + stacked || cd[stacked] != p.b || cd[stacked + 1] != p.g || cd[stacked + 3] != p.k ||
      vc.dimensions().size() != cd.size() || md[0] != p.b)
    return ffi::Error::InvalidArgument("decode attention: caches [(layers,) b, g, slots, k] matching q");
  p.slots = cd[stacked + 2];
  if (p.read > p.slots) return ffi::Error::InvalidArgument("decode attention: mask longer than the cache");
  const auto type = kc.element_type();
  if (type != vc.element_type() || (type != ffi::DataType::F32 && type != ffi::DataType::BF16))
    return ffi::Error::InvalidArgument("decode attention: float32 or bfloat16 caches");
  const int64_t index = layer.element_count() ? layer.typed_data()[0] : 0;
  if (layers < 1 || index < 0 || index >= layers) return ffi::Error::InvalidArgument("decode attention: layer index out of range");
  const int64_t per_layer = p.b * p.g * p.slots * p.k * static_cast<int64_t>(type == ffi::DataType::F32 ? 4 : 2);
  p.kc = static_cast<const uint8_t*>(kc.untyped_data()) + index * per_layer;
  p.vc = static_cast<const uint8_t*>(vc.untyped_data()) + index * per_layer;
  p.q = q.typed_data();
  p.mask = mask.typed_data();
  p.knew = knew.typed_data();
  p.vnew = vnew.typed_data();
  p.sinks = sinks.element_count() ? sinks.typed_data() : nullptr;
  p.out = out->typed_data();
  p.scale = scale;
  p.softcap = softcap;
  work->bf16 = type == ffi::DataType::BF16;
  work->n_items = p.b * p.g;
  // Helpers only where there is enough to share: a few dispatches cost more than a short cache's whole attention.
  const int64_t size = p.b * p.g * p.r * p.read * p.k;
  const int64_t helpers = size < (1 << 16) ? 0 : std::min<int64_t>(pool.num_threads(), work->n_items) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->run(); });
  work->run();
  for (int spins = 0; work->done.load(std::memory_order_acquire) < work->n_items; ++spins) {
    if (spins > 1000) std::this_thread::yield();
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxmapDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q [b, g, r, k]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // layer index into stacked caches
                                  .Arg<ffi::AnyBuffer>()          // key cache
                                  .Arg<ffi::AnyBuffer>()          // value cache
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask [b, read]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // new key [b, g, k]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // new value [b, g, k]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // sinks [g, r] or empty
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out [b, g, r, k]
                                  .Attr<float>("scale")
                                  .Attr<float>("softcap")
                                  .Attr<int64_t>("layers"));
