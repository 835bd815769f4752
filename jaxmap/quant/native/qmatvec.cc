// jaxmap's CPU product of a few activation rows with a block-quantized weight, called from XLA through the FFI.
//
// Why: XLA:CPU fuses the dequantization into a matrix-vector loop that unpacks and scales every code on its way into
// the multiply; the decode of a Q4 model is then bound by that loop, not by memory. This kernel reads each weight
// once, unpacks 16 codes per vector instruction (two rows at once from a 4-bit plane's bytes), multiplies them as
// floats with the (float, unquantized) activation, applies each sub-block's scale to its partial sums once and its
// offset / min through the activation's sub-block sums, with output rows split over XLA's intra-op thread pool.
// Results equal the dequantized product up to float summation order. Two things decide its speed beyond the inner
// loop: a decode reads every weight once from memory, so the loop prefetches a few rows ahead (the hardware
// prefetcher alone leaves it waiting, 1.6x slower over a model); and rows are short (576 inputs is 18 blocks), so each
// row's scales and constant terms are computed with vector instructions too (scalar, they took a third of the time).
//
// The storage is jaxmap's QTensor (jaxmap/quant/qtensor.py): value codes in bit planes packed across output rows
// (byte [j, i] of a w-bit plane holds column i of rows 8/w*j + k at shift k*w; the first plane holds the low bits),
// float16 block scales d [out, n_block] (and mins m, or a K type's dmin), K types' scale / min codes in planes
// [out*w/8, n_sub]. A weight is a * (code - offset) + b per sub-block of `sub` inputs:
//   simple types: a = d[block], b = m[block] (0 without mins)
//   K types:      a = d[super-block] * (scale code - scale_offset), b = -dmin[super-block] * min code
// so y[t, r] = sum_s a_s * (code_s . x_ts) + (b_s - a_s * offset) * sum(x_ts).
//
// Vector code for AVX-512 and for AVX2 (+FMA, F16C); other CPUs keep XLA's products (jaxmap does not build it).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#if !(defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#error "jaxmap's native kernel needs an x86-64 CPU with AVX2, FMA and F16C (jaxmap checks before building)"
#endif
#include <immintrin.h>

// The AVX-512 code uses byte and word masks (BW) at 128 and 256 bits (VL) besides the foundation.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define JAXMAP_AVX512 1
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {


constexpr int kMaxRows = 32;  // activation rows one call takes (the caller checks: jaxmap.quant.native.max_rows)
constexpr int64_t kAhead = 8;  // weight byte rows prefetched ahead of the one being read

inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

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
#if defined(JAXMAP_AVX512)
  // codes of columns col..col+15 (lanes past `k` zero), as 32-bit lanes
  __m512i at16(int64_t col, __mmask16 k) const {
    __m512i code = _mm512_setzero_si512();
    for (int p = 0; p < 2 && base[p]; ++p) {
      __m512i v = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, base[p] + col));
      v = _mm512_and_si512(_mm512_srli_epi32(v, shift[p]), _mm512_set1_epi32(mask[p]));
      code = _mm512_or_si512(code, p ? _mm512_slli_epi32(v, width0) : v);
    }
    return code;
  }
#endif
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
#if defined(JAXMAP_AVX512)
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
constexpr bool kHighPairs = true;  // pair32 takes 5- and 6-bit codes (AVX2 reads those row by row)

// Two weight rows sharing a 4-bit plane's bytes p (row A the low nibbles, row B the high ones) and, for 5- and 6-bit
// codes, their high bits in plane h (W1 bits per row, row A's at bit mask `ha`, row B's at `hb`): a 32-column block
// becomes floats once, a high bit adding 16 (32 for a 6-bit code's second) under a mask tested straight from the
// bytes, and meets up to 8 activation rows, so unpacking is paid once per weight, not per row. (A 16-float table
// lookup for the nibbles, tried, was slower: it competes with the widening for the same port.)
template <int W1>
inline void pair_codes(const uint8_t* p, const uint8_t* h, int ha, int hb, __m512* a, __m512* b) {
  for (int q = 0; q < 2; ++q) {
    const __m512i c = widen16(p + 16 * q);
    a[q] = _mm512_cvtepi32_ps(_mm512_and_si512(c, _mm512_set1_epi32(15)));
    b[q] = _mm512_cvtepi32_ps(_mm512_srli_epi32(c, 4));
    if (W1) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(h + 16 * q));
      const __m512 sixteen = _mm512_set1_ps(16.f), thirty_two = _mm512_set1_ps(32.f);
      a[q] = _mm512_mask_add_ps(a[q], _mm_test_epi8_mask(bytes, _mm_set1_epi8(static_cast<char>(ha))), a[q], sixteen);
      b[q] = _mm512_mask_add_ps(b[q], _mm_test_epi8_mask(bytes, _mm_set1_epi8(static_cast<char>(hb))), b[q], sixteen);
      if (W1 == 2) {
        a[q] = _mm512_mask_add_ps(a[q], _mm_test_epi8_mask(bytes, _mm_set1_epi8(static_cast<char>(ha << 1))), a[q],
                                  thirty_two);
        b[q] = _mm512_mask_add_ps(b[q], _mm_test_epi8_mask(bytes, _mm_set1_epi8(static_cast<char>(hb << 1))), b[q],
                                  thirty_two);
      }
    }
  }
}

template <int SUBS>
inline __m512 block_dot(__m512 acc, const __m512* codes, const float* x, float lo, float hi) {
  const __m512 h0 = _mm512_mul_ps(codes[0], _mm512_loadu_ps(x));
  if (SUBS == 1) return _mm512_fmadd_ps(_mm512_fmadd_ps(codes[1], _mm512_loadu_ps(x + 16), h0), _mm512_set1_ps(lo), acc);
  return _mm512_fmadd_ps(_mm512_mul_ps(codes[1], _mm512_loadu_ps(x + 16)), _mm512_set1_ps(hi),
                         _mm512_fmadd_ps(h0, _mm512_set1_ps(lo), acc));
}

#else  // AVX2
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
constexpr bool kHighPairs = false;
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
#endif

// Weight row r's per-sub-block scale a[s] and constant c[s] = b[s] - a[s] * offset (scalar work, once per row).
void row_scales(const Problem& p, int64_t r, float* a, float* c) {
  const uint16_t* d = p.d + r * p.n_block;
  const uint16_t* m = p.m ? p.m + r * p.n_block : nullptr;
  const float offset = static_cast<float>(p.offset);
  if (!p.k_type) {  // one float16 scale (and min) per sub-block
    int64_t s0 = 0;
#if defined(JAXMAP_AVX512)
    const __m512 off = _mm512_set1_ps(offset);
    for (; s0 < p.n_sub; s0 += 16) {
      const __mmask16 k = p.n_sub - s0 >= 16 ? 0xffff : static_cast<__mmask16>((1u << (p.n_sub - s0)) - 1);
      const __m512 av = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, d + s0));
      const __m512 mv = m ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, m + s0)) : _mm512_setzero_ps();
      _mm512_mask_storeu_ps(a + s0, k, av);
      _mm512_mask_storeu_ps(c + s0, k, _mm512_fnmadd_ps(av, off, mv));
    }
#endif
    for (int64_t s = s0; s < p.n_sub; ++s) {
      a[s] = half_to_float(d[s]);
      c[s] = (m ? half_to_float(m[s]) : 0.f) - a[s] * offset;
    }
    return;
  }
  int per_shift = 0;  // sub-blocks per super-block: a power of two (8 or 16)
  while ((p.sub << per_shift) < p.block) ++per_shift;
  const RowCodes sc(p.sc, r, p.n_sub), mc(p.mc, r, p.n_sub);
  int64_t s0 = 0;
#if defined(JAXMAP_AVX512)
  // 16 sub-blocks span at most two super-blocks: their two scales are picked per lane from one load
  const __m512 off = _mm512_set1_ps(offset);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; s0 < p.n_sub; s0 += 16) {
    const __mmask16 k = p.n_sub - s0 >= 16 ? 0xffff : static_cast<__mmask16>((1u << (p.n_sub - s0)) - 1);
    const int64_t blk0 = s0 >> per_shift, left = std::min<int64_t>(16, p.n_block - blk0);
    const __mmask16 kb = left >= 16 ? 0xffff : static_cast<__mmask16>((1u << left) - 1);
    const __m512i pick = _mm512_sub_epi32(_mm512_srli_epi32(_mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(s0))), per_shift),
                                          _mm512_set1_epi32(static_cast<int>(blk0)));
    const __m512 dv = _mm512_permutexvar_ps(pick, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(kb, d + blk0)));
    const __m512 codes = _mm512_cvtepi32_ps(_mm512_sub_epi32(sc.at16(s0, k), _mm512_set1_epi32(p.scale_offset)));
    const __m512 av = _mm512_mul_ps(dv, codes);
    __m512 bv = _mm512_setzero_ps();
    if (m) {
      const __m512 mv = _mm512_permutexvar_ps(pick, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(kb, m + blk0)));
      bv = _mm512_sub_ps(bv, _mm512_mul_ps(mv, _mm512_cvtepi32_ps(mc.at16(s0, k))));
    }
    _mm512_mask_storeu_ps(a + s0, k, av);
    _mm512_mask_storeu_ps(c + s0, k, _mm512_fnmadd_ps(av, off, bv));
  }
#endif
  for (int64_t s = s0; s < p.n_sub; ++s) {
    const int64_t blk = s >> per_shift;
    a[s] = half_to_float(d[blk]) * static_cast<float>(sc.at(s) - p.scale_offset);
    const float b = m ? -half_to_float(m[blk]) * static_cast<float>(mc.at(s)) : 0.f;
    c[s] = b - a[s] * offset;
  }
}


// acc + c . xsum (a row's constant terms), folded into the vector accumulator before its one reduction.
inline Acc tail(Acc acc, const float* c, const float* xsum, int64_t n) {
#if defined(JAXMAP_AVX512)
  for (int64_t s = 0; s < n; s += 16) {
    const __mmask16 k = n - s >= 16 ? 0xffff : static_cast<__mmask16>((1u << (n - s)) - 1);
    acc.v = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, c + s), _mm512_maskz_loadu_ps(k, xsum + s), acc.v);
  }
  return acc;
#else
  float t = 0.f;
  for (int64_t s = 0; s < n; ++s) t += c[s] * xsum[s];
  return {_mm256_add_ps(acc.v, _mm256_setr_ps(t, 0, 0, 0, 0, 0, 0, 0))};
#endif
}

// Ask for a weight's bytes a few rows ahead: rows are short (a few hundred bytes) and each call reads a fresh weight,
// so the hardware prefetcher alone leaves the loop waiting on memory.
inline void prefetch(const uint8_t* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }

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
        if (t == 0 && (j & 1) == 0) {
          prefetch(base0 + kAhead * in + 32 * j);
          if (W1) prefetch(base1 + kAhead * in + 32 * j);
        }
        acc = block32<W0, W1, SUBS>(acc, base0 + 32 * j, W1 ? base1 + 32 * j : nullptr, shift0, shift1, x + 32 * j,
                                    a[j * SUBS], a[j * SUBS + SUBS - 1]);
      }
      p.y[t * p.out + r] = hsum(tail(acc, c, p.xsum.data() + t * p.n_sub, p.n_sub));
    }
  }
}

#if defined(JAXMAP_AVX512)
// Rows r, r+1 of the weight against activation rows t0 .. t0+NT-1; results into y.
template <int W1, int SUBS, int NT>
void pair_rows(const Problem& p, int64_t r, int t0, const uint8_t* base, const uint8_t* high, int ha, int hb,
               const float* a0, const float* c0, const float* a1, const float* c1, bool first) {
  const int64_t in = p.in, n32 = in / 32, per1 = W1 ? 8 / W1 : 1;
  __m512 acc0[NT], acc1[NT];
  for (int t = 0; t < NT; ++t) acc0[t] = acc1[t] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n32; ++j) {
    if (first && (j & 1) == 0) {
      prefetch(base + kAhead * in + 32 * j);
      if (W1 && (r / 2) % (per1 / 2) == 0) prefetch(high + kAhead * in + 32 * j);
    }
    __m512 ca[2], cb[2];
    pair_codes<W1>(base + 32 * j, W1 ? high + 32 * j : nullptr, ha, hb, ca, cb);
    const float lo0 = a0[j * SUBS], hi0 = a0[j * SUBS + SUBS - 1], lo1 = a1[j * SUBS], hi1 = a1[j * SUBS + SUBS - 1];
    for (int t = 0; t < NT; ++t) {
      const float* x = p.x + (t0 + t) * in + 32 * j;
      acc0[t] = block_dot<SUBS>(acc0[t], ca, x, lo0, hi0);
      acc1[t] = block_dot<SUBS>(acc1[t], cb, x, lo1, hi1);
    }
  }
  for (int t = 0; t < NT; ++t) {
    const float* xsum = p.xsum.data() + (t0 + t) * p.n_sub;
    p.y[(t0 + t) * p.out + r] = hsum(tail({acc0[t]}, c0, xsum, p.n_sub));
    p.y[(t0 + t) * p.out + r + 1] = hsum(tail({acc1[t]}, c1, xsum, p.n_sub));
  }
}
#endif

// A 4-bit plane (Q4_0, Q4_1, Q4_K; with a W1-bit high plane Q5_0, Q5_1, Q5_K, Q6_K): rows 2i and 2i+1 from the
// same bytes, read and widened once.
template <int W1, int R, int SUBS>
void pair_range(const Problem& p, int64_t r0, int64_t r1) {
  const int rows = R ? R : static_cast<int>(p.rows);
  const int64_t in = p.in, n32 = in / 32, per1 = W1 ? 8 / W1 : 1;
  std::vector<float> scales(4 * p.n_sub);
  float *a0 = scales.data(), *c0 = a0 + p.n_sub, *a1 = c0 + p.n_sub, *c1 = a1 + p.n_sub;
  for (int64_t r = r0; r < r1; r += 2) {
    if (r % 2 || r + 1 >= r1) {  // a chunk never starts on an odd row; an odd last row goes alone
      rows_range<4, W1, R, SUBS>(p, r, std::min(r1, r + 1));
      r -= 1;
      continue;
    }
    row_scales(p, r, a0, c0);
    row_scales(p, r + 1, a1, c1);
    const uint8_t* base = p.q[0].data + (r / 2) * in;
    const uint8_t* high = W1 ? p.q[1].data + (r / per1) * in : nullptr;
    const int ha = W1 ? 1 << ((r % per1) * W1) : 0, hb = W1 ? 1 << (((r + 1) % per1) * W1) : 0;
#if defined(JAXMAP_AVX512)
    {  // up to eight activation rows at a time against the pair's unpacked codes
      int t = 0;
      for (; t + 8 <= rows; t += 8) pair_rows<W1, SUBS, 8>(p, r, t, base, high, ha, hb, a0, c0, a1, c1, t == 0);
      for (; t + 4 <= rows; t += 4) pair_rows<W1, SUBS, 4>(p, r, t, base, high, ha, hb, a0, c0, a1, c1, t == 0);
      if (rows - t == 3) pair_rows<W1, SUBS, 3>(p, r, t, base, high, ha, hb, a0, c0, a1, c1, t == 0);
      if (rows - t == 2) pair_rows<W1, SUBS, 2>(p, r, t, base, high, ha, hb, a0, c0, a1, c1, t == 0);
      if (rows - t == 1) pair_rows<W1, SUBS, 1>(p, r, t, base, high, ha, hb, a0, c0, a1, c1, t == 0);
    }
#else  // AVX2: one activation row at a time, 4-bit codes only (kHighPairs)
    for (int t = 0; t < rows; ++t) {
      const float* x = p.x + t * in;
      Acc acc0 = zero(), acc1 = zero();
      for (int64_t j = 0; j < n32; ++j) {
        if (t == 0 && (j & 1) == 0) prefetch(base + kAhead * in + 32 * j);
        pair32<SUBS>(acc0, acc1, base + 32 * j, x + 32 * j, a0[j * SUBS], a0[j * SUBS + SUBS - 1], a1[j * SUBS],
                     a1[j * SUBS + SUBS - 1]);
      }
      const float* xsum = p.xsum.data() + t * p.n_sub;
      p.y[t * p.out + r] = hsum(tail(acc0, c0, xsum, p.n_sub));
      p.y[t * p.out + r + 1] = hsum(tail(acc1, c1, xsum, p.n_sub));
    }
#endif
  }
}

using RangeFn = void (*)(const Problem&, int64_t, int64_t);

template <int W0, int W1, int SUBS>
RangeFn pick_rows(int64_t rows) {
  if (W0 == 4 && (W1 == 0 || kHighPairs)) return rows == 1 ? &pair_range<W1, 1, SUBS> : &pair_range<W1, 0, SUBS>;
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
  if (p.rows < 1 || p.rows > kMaxRows) return ffi::Error::InvalidArgument("qmatvec: 1 to 32 activation rows");
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

// Whether this build has the AVX-512 paths (several activation rows per unpacked weight: up to kMaxRows rows pay).
extern "C" int JaxmapQMatvecAvx512() {
#if defined(JAXMAP_AVX512)
  return 1;
#else
  return 0;
#endif
}
