// jaxmap's CPU product of a few activation rows with a block-quantized weight, called from XLA through the FFI.
//
// Why: XLA:CPU fuses the dequantization into a matrix-vector loop that unpacks and scales every code on its way into
// the multiply; the decode of a Q4 model is then bound by that loop, not by memory. This kernel reads each weight
// once, unpacks 16 codes per vector instruction (two rows at once from a 4-bit plane's bytes), multiplies them as
// floats with the (float, unquantized) activation, applies each sub-block's scale to its partial sums once and its
// offset / min through the activation's sub-block sums, with output rows split over XLA's intra-op thread pool.
// Results equal the dequantized product up to float summation order.
//
// The storage is jaxmap's QTensor (jaxmap/quant/qtensor.py): value codes in bit planes packed across output rows
// (byte [j, i] of a w-bit plane holds column i of rows 8/w*j + k at shift k*w; the first plane holds the low bits),
// float16 block scales d [out, n_block] (and mins m, or a K type's dmin), K types' scale / min codes in planes
// [out*w/8, n_sub]. A weight is a * (code - offset) + b per sub-block of `sub` inputs:
//   simple types: a = d[block], b = m[block] (0 without mins)
//   K types:      a = d[super-block] * (scale code - scale_offset), b = -dmin[super-block] * min code
// so y[t, r] = sum_s a_s * (code_s . x_ts) + (b_s - a_s * offset) * sum(x_ts).
//
// Vector code for AVX-512 and AVX2 (+FMA); plain loops elsewhere (the compiler vectorises what it can).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {


constexpr int kMaxRows = 16;  // activation rows one call takes (the caller checks)

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#endif
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exponent = (h >> 10) & 0x1f;
  uint32_t mantissa = h & 0x3ff;
  uint32_t bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    exponent = 113;
    while ((mantissa & 0x400) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

struct Plane {
  const uint8_t* data = nullptr;
  int width = 0;  // bits per code in this plane (8, 4, 2, 1); 0: absent
};

// One weight row's codes in up to two planes of `stride` columns (K types' scale / min codes), read one by one.
struct RowCodes {
  const uint8_t* base[2] = {nullptr, nullptr};
  int shift[2] = {0, 0}, mask[2] = {0, 0}, width0 = 0;

  RowCodes(const Plane* planes, int64_t row, int64_t stride) {
    for (int p = 0; p < 2 && planes[p].width && planes[p].data; ++p) {
      const int w = planes[p].width, per = 8 / w;
      base[p] = planes[p].data + (row / per) * stride;
      shift[p] = static_cast<int>(row % per) * w;
      mask[p] = (1 << w) - 1;
    }
    width0 = planes[0].width;
  }
  int at(int64_t col) const {
    int code = base[0] ? (base[0][col] >> shift[0]) & mask[0] : 0;
    if (base[1]) code |= ((base[1][col] >> shift[1]) & mask[1]) << width0;
    return code;
  }
};

struct Problem {
  const float* x = nullptr;  // [rows, in]
  float* y = nullptr;        // [rows, out]
  int64_t rows = 0, out = 0, in = 0;
  Plane q[2];
  int offset = 0, sub = 32, block = 32;
  bool k_type = false;
  const uint16_t* d = nullptr;  // float16 [out, n_block]
  const uint16_t* m = nullptr;  // float16 [out, n_block]: mins (simple) or dmin (K); may be null
  int64_t n_block = 0, n_sub = 0;
  Plane sc[2], mc[2];
  int scale_offset = 0;
  std::vector<float> xsum;  // [rows, n_sub]: the exact float sum of each sub-block of x
};

// The float sums of x's sub-blocks (what a weight's constant term multiplies).
void sum_activation(Problem& p) {
  p.xsum.assign(p.rows * p.n_sub, 0.f);
  for (int64_t t = 0; t < p.rows; ++t)
    for (int64_t s = 0; s < p.n_sub; ++s) {
      float acc = 0.f;
      for (int64_t i = 0; i < p.sub; ++i) acc += p.x[t * p.in + s * p.sub + i];
      p.xsum[t * p.n_sub + s] = acc;
    }
}

// One 32-column block of a weight row against the float activation: code bytes widened to 32-bit lanes (x86 has no
// vector byte shifts), shifted and masked out of their planes, converted to float and multiplied with x; the block's
// partial sums are scaled into the row's accumulator once, with one scale for columns 0-15 and one for 16-31 (the two
// sub-blocks of a 16-element type; the same scale otherwise, SUBS = 1). pair32 serves two rows that share a 4-bit
// plane's bytes (low and high nibbles), widening them once.
#if defined(__AVX512F__)
struct Acc {
  __m512 v;
};
inline Acc zero() { return {_mm512_setzero_ps()}; }
inline float hsum(Acc a) { return _mm512_reduce_add_ps(a.v); }
inline __m512i widen16(const uint8_t* p) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m512i bits(__m512i c, int shift, int width) {
  return width == 8 ? c : _mm512_and_si512(_mm512_srl_epi32(c, _mm_cvtsi32_si128(shift)), _mm512_set1_epi32((1 << width) - 1));
}
template <int W0, int W1>
inline __m512 codes16(const uint8_t* p0, const uint8_t* p1, int shift0, int shift1) {
  __m512i c = bits(widen16(p0), shift0, W0);
  if (W1) c = _mm512_or_si512(c, _mm512_slli_epi32(bits(widen16(p1), shift1, W1), W0));
  return _mm512_cvtepi32_ps(c);
}
template <int W0, int W1, int SUBS>
inline Acc block32(Acc acc, const uint8_t* p0, const uint8_t* p1, int shift0, int shift1, const float* x, float lo,
                   float hi) {
  const __m512 h0 = _mm512_mul_ps(codes16<W0, W1>(p0, p1, shift0, shift1), _mm512_loadu_ps(x));
  const __m512 h1 = codes16<W0, W1>(p0 + 16, W1 ? p1 + 16 : nullptr, shift0, shift1);
  if (SUBS == 1) return {_mm512_fmadd_ps(_mm512_fmadd_ps(h1, _mm512_loadu_ps(x + 16), h0), _mm512_set1_ps(lo), acc.v)};
  const __m512 v = _mm512_fmadd_ps(h0, _mm512_set1_ps(lo), acc.v);
  return {_mm512_fmadd_ps(_mm512_mul_ps(h1, _mm512_loadu_ps(x + 16)), _mm512_set1_ps(hi), v)};
}
template <int SUBS>
inline void pair32(Acc& a0, Acc& a1, const uint8_t* p, const float* x, float lo0, float hi0, float lo1, float hi1) {
  const __m512i mask = _mm512_set1_epi32(15);
  const __m512i c0 = widen16(p), c1 = widen16(p + 16);
  const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
  const __m512 l0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(c0, mask)), x0);
  const __m512 l1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(c1, mask)), x1);
  const __m512 u0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(c0, 4)), x0);
  const __m512 u1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(c1, 4)), x1);
  if (SUBS == 1) {
    a0.v = _mm512_fmadd_ps(_mm512_add_ps(l0, l1), _mm512_set1_ps(lo0), a0.v);
    a1.v = _mm512_fmadd_ps(_mm512_add_ps(u0, u1), _mm512_set1_ps(lo1), a1.v);
  } else {
    a0.v = _mm512_fmadd_ps(l1, _mm512_set1_ps(hi0), _mm512_fmadd_ps(l0, _mm512_set1_ps(lo0), a0.v));
    a1.v = _mm512_fmadd_ps(u1, _mm512_set1_ps(hi1), _mm512_fmadd_ps(u0, _mm512_set1_ps(lo1), a1.v));
  }
}
#elif defined(__AVX2__) && defined(__FMA__)
struct Acc {
  __m256 v;
};
inline Acc zero() { return {_mm256_setzero_ps()}; }
inline float hsum(Acc a) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}
inline __m256i widen8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
inline __m256i bits(__m256i c, int shift, int width) {
  return width == 8 ? c : _mm256_and_si256(_mm256_srl_epi32(c, _mm_cvtsi32_si128(shift)), _mm256_set1_epi32((1 << width) - 1));
}
template <int W0, int W1>
inline __m256 codes8(const uint8_t* p0, const uint8_t* p1, int shift0, int shift1) {
  __m256i c = bits(widen8(p0), shift0, W0);
  if (W1) c = _mm256_or_si256(c, _mm256_slli_epi32(bits(widen8(p1), shift1, W1), W0));
  return _mm256_cvtepi32_ps(c);
}
template <int W0, int W1, int SUBS>
inline Acc block32(Acc acc, const uint8_t* p0, const uint8_t* p1, int shift0, int shift1, const float* x, float lo,
                   float hi) {
  __m256 part[2];
  for (int h = 0; h < 2; ++h) {
    __m256 v = _mm256_mul_ps(codes8<W0, W1>(p0 + 16 * h, W1 ? p1 + 16 * h : nullptr, shift0, shift1),
                             _mm256_loadu_ps(x + 16 * h));
    part[h] = _mm256_fmadd_ps(codes8<W0, W1>(p0 + 16 * h + 8, W1 ? p1 + 16 * h + 8 : nullptr, shift0, shift1),
                              _mm256_loadu_ps(x + 16 * h + 8), v);
  }
  if (SUBS == 1) return {_mm256_fmadd_ps(_mm256_add_ps(part[0], part[1]), _mm256_set1_ps(lo), acc.v)};
  return {_mm256_fmadd_ps(part[1], _mm256_set1_ps(hi), _mm256_fmadd_ps(part[0], _mm256_set1_ps(lo), acc.v))};
}
template <int SUBS>
inline void pair32(Acc& a0, Acc& a1, const uint8_t* p, const float* x, float lo0, float hi0, float lo1, float hi1) {
  const __m256i mask = _mm256_set1_epi32(15);
  __m256 l[2], u[2];
  for (int h = 0; h < 2; ++h) {
    l[h] = _mm256_setzero_ps();
    u[h] = _mm256_setzero_ps();
    for (int q = 0; q < 2; ++q) {
      const __m256i c = widen8(p + 16 * h + 8 * q);
      const __m256 xv = _mm256_loadu_ps(x + 16 * h + 8 * q);
      l[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(c, mask)), xv, l[h]);
      u[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(c, 4)), xv, u[h]);
    }
  }
  if (SUBS == 1) {
    a0.v = _mm256_fmadd_ps(_mm256_add_ps(l[0], l[1]), _mm256_set1_ps(lo0), a0.v);
    a1.v = _mm256_fmadd_ps(_mm256_add_ps(u[0], u[1]), _mm256_set1_ps(lo1), a1.v);
  } else {
    a0.v = _mm256_fmadd_ps(l[1], _mm256_set1_ps(hi0), _mm256_fmadd_ps(l[0], _mm256_set1_ps(lo0), a0.v));
    a1.v = _mm256_fmadd_ps(u[1], _mm256_set1_ps(hi1), _mm256_fmadd_ps(u[0], _mm256_set1_ps(lo1), a1.v));
  }
}
#else
struct Acc {
  float v;
};
inline Acc zero() { return {0.f}; }
inline float hsum(Acc a) { return a.v; }
template <int W0, int W1, int SUBS>
inline Acc block32(Acc acc, const uint8_t* p0, const uint8_t* p1, int shift0, int shift1, const float* x, float lo,
                   float hi) {
  float half[2] = {0.f, 0.f};
  for (int i = 0; i < 32; ++i) {
    int v = W0 == 8 ? p0[i] : (p0[i] >> shift0) & ((1 << W0) - 1);
    if (W1) v |= ((p1[i] >> shift1) & ((1 << W1) - 1)) << W0;
    half[i / 16] += static_cast<float>(v) * x[i];
  }
  return {acc.v + lo * half[0] + hi * half[1]};
}
template <int SUBS>
inline void pair32(Acc& a0, Acc& a1, const uint8_t* p, const float* x, float lo0, float hi0, float lo1, float hi1) {
  float s0[2] = {0.f, 0.f}, s1[2] = {0.f, 0.f};
  for (int i = 0; i < 32; ++i) {
    s0[i / 16] += static_cast<float>(p[i] & 15) * x[i];
    s1[i / 16] += static_cast<float>(p[i] >> 4) * x[i];
  }
  a0.v += lo0 * s0[0] + hi0 * s0[1];
  a1.v += lo1 * s1[0] + hi1 * s1[1];
}
#endif

// Weight row r's per-sub-block scale a[s] and constant c[s] = b[s] - a[s] * offset (scalar work, once per row).
void row_scales(const Problem& p, int64_t r, float* a, float* c) {
  const uint16_t* d = p.d + r * p.n_block;
  const uint16_t* m = p.m ? p.m + r * p.n_block : nullptr;
  const float offset = static_cast<float>(p.offset);
  if (!p.k_type) {  // one float16 scale (and min) per sub-block
    for (int64_t s = 0; s < p.n_sub; ++s) {
      a[s] = half_to_float(d[s]);
      c[s] = (m ? half_to_float(m[s]) : 0.f) - a[s] * offset;
    }
    return;
  }
  int per_shift = 0;  // sub-blocks per super-block: a power of two (8 or 16)
  while ((p.sub << per_shift) < p.block) ++per_shift;
  const RowCodes sc(p.sc, r, p.n_sub), mc(p.mc, r, p.n_sub);
  for (int64_t s = 0; s < p.n_sub; ++s) {
    const int64_t blk = s >> per_shift;
    a[s] = half_to_float(d[blk]) * static_cast<float>(sc.at(s) - p.scale_offset);
    const float b = m ? -half_to_float(m[blk]) * static_cast<float>(mc.at(s)) : 0.f;
    c[s] = b - a[s] * offset;
  }
}

template <int W0, int W1, int R, int SUBS>
void rows_range(const Problem& p, int64_t r0, int64_t r1) {
  const int rows = R ? R : static_cast<int>(p.rows);
  const int64_t in = p.in, per0 = 8 / W0, per1 = W1 ? 8 / W1 : 1, n32 = in / 32;
  std::vector<float> scales(2 * p.n_sub);
  float* a = scales.data();
  float* c = a + p.n_sub;
  for (int64_t r = r0; r < r1; ++r) {
    row_scales(p, r, a, c);
    const uint8_t* base0 = p.q[0].data + (r / per0) * in;
    const uint8_t* base1 = W1 ? p.q[1].data + (r / per1) * in : nullptr;
    const int shift0 = static_cast<int>((r % per0) * W0), shift1 = W1 ? static_cast<int>((r % per1) * W1) : 0;
    for (int t = 0; t < rows; ++t) {
      const float* x = p.x + t * in;
      Acc acc = zero();
      for (int64_t j = 0; j < n32; ++j) {
        acc = block32<W0, W1, SUBS>(acc, base0 + 32 * j, W1 ? base1 + 32 * j : nullptr, shift0, shift1, x + 32 * j,
                                    a[j * SUBS], a[j * SUBS + SUBS - 1]);
      }
      float tail = 0.f;
      const float* xsum = p.xsum.data() + t * p.n_sub;
      for (int64_t s = 0; s < p.n_sub; ++s) tail += c[s] * xsum[s];
      p.y[t * p.out + r] = hsum(acc) + tail;
    }
  }
}

// One 4-bit plane alone (Q4_0, Q4_1, Q4_K): rows 2i and 2i+1 from the same bytes, read and widened once.
template <int R, int SUBS>
void pair_range(const Problem& p, int64_t r0, int64_t r1) {
  const int rows = R ? R : static_cast<int>(p.rows);
  const int64_t in = p.in, n32 = in / 32;
  std::vector<float> scales(4 * p.n_sub);
  float *a0 = scales.data(), *c0 = a0 + p.n_sub, *a1 = c0 + p.n_sub, *c1 = a1 + p.n_sub;
  for (int64_t r = r0; r < r1; r += 2) {
    if (r % 2 || r + 1 >= r1) {  // a chunk never starts on an odd row; an odd last row goes alone
      rows_range<4, 0, R, SUBS>(p, r, std::min(r1, r + 1));
      r -= 1;
      continue;
    }
    row_scales(p, r, a0, c0);
    row_scales(p, r + 1, a1, c1);
    const uint8_t* base = p.q[0].data + (r / 2) * in;
    for (int t = 0; t < rows; ++t) {
      const float* x = p.x + t * in;
      Acc acc0 = zero(), acc1 = zero();
      for (int64_t j = 0; j < n32; ++j) {
        pair32<SUBS>(acc0, acc1, base + 32 * j, x + 32 * j, a0[j * SUBS], a0[j * SUBS + SUBS - 1], a1[j * SUBS],
                     a1[j * SUBS + SUBS - 1]);
      }
      float tail0 = 0.f, tail1 = 0.f;
      const float* xsum = p.xsum.data() + t * p.n_sub;
      for (int64_t s = 0; s < p.n_sub; ++s) {
        tail0 += c0[s] * xsum[s];
        tail1 += c1[s] * xsum[s];
      }
      p.y[t * p.out + r] = hsum(acc0) + tail0;
      p.y[t * p.out + r + 1] = hsum(acc1) + tail1;
    }
  }
}

using RangeFn = void (*)(const Problem&, int64_t, int64_t);

template <int W0, int W1, int SUBS>
RangeFn pick_rows(int64_t rows) {
  if (W0 == 4 && W1 == 0) return rows == 1 ? &pair_range<1, SUBS> : &pair_range<0, SUBS>;
  return rows == 1 ? &rows_range<W0, W1, 1, SUBS> : &rows_range<W0, W1, 0, SUBS>;
}

template <int W0, int W1>
RangeFn pick_subs(const Problem& p) {
  return p.sub == 32 ? pick_rows<W0, W1, 1>(p.rows) : pick_rows<W0, W1, 2>(p.rows);
}

RangeFn pick(const Problem& p) {
  const int w0 = p.q[0].width, w1 = p.q[1].width;
  if (w0 == 4 && w1 == 0) return pick_subs<4, 0>(p);
  if (w0 == 8 && w1 == 0) return pick_subs<8, 0>(p);
  if (w0 == 4 && w1 == 1) return pick_subs<4, 1>(p);
  if (w0 == 4 && w1 == 2) return pick_subs<4, 2>(p);
  if (w0 == 2 && w1 == 0) return pick_subs<2, 0>(p);
  if (w0 == 2 && w1 == 1) return pick_subs<2, 1>(p);
  return nullptr;
}

// Work shared by the calling thread and the pool's helpers: chunks of rows taken in turn. A helper that starts after
// every chunk is taken returns at once, so the caller only waits for chunks in progress, never for a helper to be
// scheduled (no deadlock when the pool's threads are busy), and the state outlives a late helper (shared_ptr).
struct Work {
  Problem problem;
  RangeFn fn = nullptr;
  int64_t chunk = 0, n_chunks = 0;
  std::atomic<int64_t> next{0}, done{0};

  void run() {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < n_chunks;) {
      const int64_t r0 = c * chunk, r1 = std::min(problem.out, r0 + chunk);
      fn(problem, r0, r1);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// The layer `index` of a buffer holding `layers` equal layers one after another (1: the buffer is the weight).
const uint8_t* layer_of(const ffi::AnyBuffer& b, int64_t index, int64_t layers) {
  if (!b.element_count()) return nullptr;
  return static_cast<const uint8_t*>(b.untyped_data()) + index * (b.size_bytes() / layers);
}

ffi::Error QMatvec(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> layer, ffi::AnyBuffer q0, ffi::AnyBuffer q1,
                   ffi::AnyBuffer d, ffi::AnyBuffer m, ffi::AnyBuffer sc0, ffi::AnyBuffer sc1, ffi::AnyBuffer mc0,
                   ffi::AnyBuffer mc1, ffi::Result<ffi::Buffer<ffi::F32>> y, int64_t w0, int64_t w1, int64_t offset,
                   int64_t sub, int64_t block, int64_t k_type, int64_t scw0, int64_t scw1, int64_t scale_offset,
                   int64_t mcw0, int64_t mcw1, int64_t layers, int64_t threads) {
  auto work = std::make_shared<Work>();
  Problem& p = work->problem;
  const auto xd = x.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || yd.size() != 2 || xd[0] != yd[0]) return ffi::Error::InvalidArgument("qmatvec: x [rows, in], y [rows, out]");
  p.rows = xd[0];
  p.in = xd[1];
  p.out = yd[1];
  if (p.rows < 1 || p.rows > kMaxRows) return ffi::Error::InvalidArgument("qmatvec: 1 to 16 activation rows");
  if (sub != 16 && sub != 32) return ffi::Error::InvalidArgument("qmatvec: sub-blocks of 16 or 32");
  if (p.in % 32) return ffi::Error::InvalidArgument("qmatvec: input not a multiple of 32");
  if (d.element_type() != ffi::DataType::F16 || (m.element_count() && m.element_type() != ffi::DataType::F16))
    return ffi::Error::InvalidArgument("qmatvec: float16 scales");
  const int64_t index = layer.element_count() ? layer.typed_data()[0] : 0;
  if (layers < 1 || index < 0 || index >= layers) return ffi::Error::InvalidArgument("qmatvec: layer index out of range");
  p.x = x.typed_data();
  p.y = y->typed_data();
  p.q[0] = {layer_of(q0, index, layers), static_cast<int>(w0)};
  p.q[1] = {layer_of(q1, index, layers), static_cast<int>(w1)};
  p.offset = static_cast<int>(offset);
  p.sub = static_cast<int>(sub);
  p.block = static_cast<int>(block);
  p.k_type = k_type != 0;
  p.d = reinterpret_cast<const uint16_t*>(layer_of(d, index, layers));
  p.m = reinterpret_cast<const uint16_t*>(layer_of(m, index, layers));
  p.n_sub = p.in / p.sub;
  p.n_block = static_cast<int64_t>(d.element_count()) / layers / p.out;
  p.sc[0] = {layer_of(sc0, index, layers), static_cast<int>(scw0)};
  p.sc[1] = {layer_of(sc1, index, layers), static_cast<int>(scw1)};
  p.mc[0] = {layer_of(mc0, index, layers), static_cast<int>(mcw0)};
  p.mc[1] = {layer_of(mc1, index, layers), static_cast<int>(mcw1)};
  p.scale_offset = static_cast<int>(scale_offset);
  if (!p.q[0].data || (w1 && !p.q[1].data) || (p.k_type && !p.sc[0].data) || (p.k_type && p.m && !p.mc[0].data))
    return ffi::Error::InvalidArgument("qmatvec: a plane named by the attributes is empty");
  work->fn = pick(p);
  if (!work->fn) return ffi::Error::InvalidArgument("qmatvec: unsupported plane widths");
  sum_activation(p);
  // Chunks of 32 rows or more, about 4 per worker so a slow thread does not hold the others back.
  const int64_t pool_threads = std::max<int64_t>(1, threads > 0 ? threads : pool.num_threads());
  int64_t chunk = (p.out + 4 * pool_threads - 1) / (4 * pool_threads);
  chunk = std::max<int64_t>(32, (chunk + 7) / 8 * 8);
  work->chunk = chunk;
  work->n_chunks = (p.out + chunk - 1) / chunk;
  const int64_t helpers = std::min(pool_threads, work->n_chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->run(); });
  work->run();
  for (int spins = 0; work->done.load(std::memory_order_acquire) < work->n_chunks; ++spins) {
    if (spins > 1000) std::this_thread::yield();
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxmapQMatvec, QMatvec,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer index into stacked weights
                                  .Arg<ffi::AnyBuffer>()         // q0
                                  .Arg<ffi::AnyBuffer>()         // q1
                                  .Arg<ffi::AnyBuffer>()         // d
                                  .Arg<ffi::AnyBuffer>()         // m / dmin
                                  .Arg<ffi::AnyBuffer>()         // sc0
                                  .Arg<ffi::AnyBuffer>()         // sc1
                                  .Arg<ffi::AnyBuffer>()         // mc0
                                  .Arg<ffi::AnyBuffer>()         // mc1
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Attr<int64_t>("w0")
                                  .Attr<int64_t>("w1")
                                  .Attr<int64_t>("offset")
                                  .Attr<int64_t>("sub")
                                  .Attr<int64_t>("block")
                                  .Attr<int64_t>("k_type")
                                  .Attr<int64_t>("scw0")
                                  .Attr<int64_t>("scw1")
                                  .Attr<int64_t>("scale_offset")
                                  .Attr<int64_t>("mcw0")
                                  .Attr<int64_t>("mcw1")
                                  .Attr<int64_t>("layers")
                                  .Attr<int64_t>("threads"));
