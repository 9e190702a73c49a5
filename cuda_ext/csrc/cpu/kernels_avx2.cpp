// AVX2 + FMA (+ F16C) CPU kernels for 2/3/4-bit codes, compiled with function target attributes and chosen at run
// time (avx2_supported), so one build runs on any x86-64 CPU and the portable kernels serve the others. No BMI2 pdep
// (microcoded and very slow on AMD Zen 1/2): codes are decoded in vector registers.
//
// The GEMV, when group_size % 64 == 0 or one group per row (the common case): two words (64 codes, one group) at a
// time (pair_codes: per plane one qword broadcast load, vpsrlvd, and, shift, or), then 8 steps of 8 weights: a shift,
// one vpermps into the per-group table, one FMA per activation row; x is reordered once per call to match
// (gemv_input_order(k, 64)). Dequantisation and the GEMV of other group sizes: one 32-code word at a time
// (word_codes: the same decode with a dword broadcast), 4 steps of 8 consecutive weights (natural order).
// Lookups: vpermps reads the low 3 bits of the shifted codes; a 16-entry table is two 8-entry halves and a blend on
// bit 3, moved to the sign bit. The table already holds (tables[t, c] - z) * s, so a looked-up value is bit-identical
// to the reference's fp32 weight; only the GEMV's summation order differs from x @ W^T.
#include <algorithm>
#include <cstring>

#include "bitplane_cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SECATEURS_X86 1
#define SECATEURS_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define SECATEURS_X86 0
#define SECATEURS_AVX2
#endif

namespace secateurs_cpu {

bool avx2_covers(const PackedView& p) {
  const bool word_in_one_group = p.group_size % kWordBits == 0 || p.n_groups == 1;
  return (p.bits == 2 || p.bits == 3 || p.bits == 4) && word_in_one_group;
}

#if SECATEURS_X86

bool avx2_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

namespace {

// One word without pdep: a dword broadcast of word w of plane k, lane l shifted right by l, leaves code 8c + l at bit
// 8c; masking it and moving plane k to bit 8c + k makes byte c of lane l the code 8c + l (natural order).
template <int BITS>
SECATEURS_AVX2 inline __m256i word_codes(const uint32_t* word, int64_t plane_stride) {
  const __m256i shifts = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i ones = _mm256_set1_epi32(0x01010101);
  __m256i codes = _mm256_setzero_si256();
  for (int k = 0; k < BITS; ++k) {
    const __m256i bits = _mm256_set1_epi32(int(word[k * plane_stride]));
    codes = _mm256_or_si256(codes, _mm256_slli_epi32(_mm256_and_si256(_mm256_srlv_epi32(bits, shifts), ones), k));
  }
  return codes;
}

// The group's table (tables[t, c] - z) * s as two 8-float halves (the upper half only for 4-bit codes).
template <int BITS>
SECATEURS_AVX2 inline void load_group_table(const PackedView& p, int64_t row, int64_t group, __m256& lo,
                                            __m256& hi) {
  const int64_t at = row * p.n_groups + group;
  const float* values = p.tables + int64_t(p.type_ids[at]) * (1 << BITS);
  const __m256 scale = _mm256_set1_ps(_cvtsh_ss(p.scales[at]));
  lo = BITS == 2 ? _mm256_zextps128_ps256(_mm_loadu_ps(values)) : _mm256_loadu_ps(values);
  hi = BITS == 4 ? _mm256_loadu_ps(values + 8) : _mm256_setzero_ps();
  if (p.zeros != nullptr) {
    const __m256 zero = _mm256_set1_ps(_cvtsh_ss(p.zeros[at]));
    lo = _mm256_sub_ps(lo, zero);
    hi = _mm256_sub_ps(hi, zero);
  }
  lo = _mm256_mul_ps(lo, scale);
  hi = _mm256_mul_ps(hi, scale);
}

// Weights of codes 8c..8c+7 of a word (c = 0..3) from its word_codes.
template <int BITS>
SECATEURS_AVX2 inline __m256 word_lookup(__m256i codes, int c, __m256 lo, __m256 hi) {
  const __m256i idx = _mm256_srli_epi32(codes, 8 * c);
  const __m256 low = _mm256_permutevar8x32_ps(lo, idx);
  if (BITS != 4) return low;  // 2/3-bit codes: bit 3 is 0, vpermps ignores it anyway
  const __m256i sign = _mm256_slli_epi32(codes, 28 - 8 * c);
  return _mm256_blendv_ps(low, _mm256_permutevar8x32_ps(hi, idx), _mm256_castsi256_ps(sign));
}

SECATEURS_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

}  // namespace

int avx2_gemv_period(const PackedView& p) { return p.group_size % 64 == 0 || p.n_groups == 1 ? 64 : 32; }

int gemv_input_order(int k, int period) {
  const int c = k / 8, l = k % 8;
  if (period == 64) return 32 * (l % 2) + 4 * c + l / 2;  // step c of a word pair, lane l (see pair_codes)
  return k;  // single words: natural order (see word_codes)
}

namespace {

int64_t words_per_group(const PackedView& p) { return p.n_groups == 1 ? p.words : p.group_size / kWordBits; }

// Software prefetch, as in the AVX-512 GEMV: each plane is one sequential stream over (row, word); the hardware
// prefetchers start late on the short rows of small layers.
constexpr int64_t kPrefetchWords = 512;  // 2 KiB ahead in each plane's stream
constexpr int64_t kPrefetchRows = 16;  // ahead in the type id / scale / zero streams

template <int BITS>
SECATEURS_AVX2 inline void prefetch_planes(const uint32_t* word, int64_t plane_stride) {
  for (int k = 0; k < BITS; ++k)
    _mm_prefetch(reinterpret_cast<const char*>(word + k * plane_stride + kPrefetchWords), _MM_HINT_T0);
}

SECATEURS_AVX2 inline void prefetch_group_streams(const PackedView& p, int64_t row) {
  const int64_t at = (row + kPrefetchRows) * p.n_groups;
  _mm_prefetch(reinterpret_cast<const char*>(p.scales + at), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(p.type_ids + at), _MM_HINT_T0);
  if (p.zeros != nullptr) _mm_prefetch(reinterpret_cast<const char*>(p.zeros + at), _MM_HINT_T0);
}

// acc[b][(BASE + c) % CHAINS] += w[codes 8c..] * x for the 4 vectors c of one word (compile-time chain indices keep
// acc in registers).
template <int BITS, int NB, int CHAINS, int BASE>
SECATEURS_AVX2 inline void accumulate_word(__m256 (&acc)[NB][CHAINS], const uint32_t* word, int64_t plane_stride,
                                           __m256 lo, __m256 hi, const float* xw, int64_t x_stride) {
  const __m256i codes = word_codes<BITS>(word, plane_stride);
  for (int c = 0; c < 4; ++c) {
    const __m256 v = word_lookup<BITS>(codes, c, lo, hi);
    for (int b = 0; b < NB; ++b)
      acc[b][(BASE + c) % CHAINS] =
          _mm256_fmadd_ps(v, _mm256_loadu_ps(xw + b * x_stride + 8 * c), acc[b][(BASE + c) % CHAINS]);
  }
}

// y[b, row] for NB activation rows starting at x; CHAINS independent accumulators per activation row hide the FMA
// latency (4 cycles).
template <int BITS, int NB>
SECATEURS_AVX2 void gemv_row(const PackedView& p, const float* x, int64_t x_stride, int64_t row, float* y) {
  constexpr int CHAINS = NB == 1 ? 8 : (NB == 2 ? 4 : 2);
  __m256 acc[NB][CHAINS];
  for (int b = 0; b < NB; ++b)
    for (int k = 0; k < CHAINS; ++k) acc[b][k] = _mm256_setzero_ps();
  const int64_t plane_stride = p.out_f * p.words, wpg = words_per_group(p);
  const uint32_t* planes = p.planes + row * p.words;
  prefetch_group_streams(p, row);
  for (int64_t g = 0, w0 = 0; w0 < p.words; ++g, w0 += wpg) {
    __m256 lo, hi;
    load_group_table<BITS>(p, row, g, lo, hi);
    const int64_t w1 = std::min(w0 + wpg, p.words);
    int64_t w = w0;
    for (; w + 2 <= w1; w += 2) {
      if (w % 16 < 2) prefetch_planes<BITS>(planes + w, plane_stride);  // one cache line per plane per 16 words
      accumulate_word<BITS, NB, CHAINS, 0>(acc, planes + w, plane_stride, lo, hi, x + w * kWordBits, x_stride);
      accumulate_word<BITS, NB, CHAINS, 4>(acc, planes + w + 1, plane_stride, lo, hi, x + (w + 1) * kWordBits,
                                           x_stride);
    }
    if (w < w1) accumulate_word<BITS, NB, CHAINS, 0>(acc, planes + w, plane_stride, lo, hi, x + w * kWordBits, x_stride);
  }
  for (int b = 0; b < NB; ++b) {
    __m256 total = acc[b][0];
    for (int k = 1; k < CHAINS; ++k) total = _mm256_add_ps(total, acc[b][k]);
    y[b * p.out_f + row] = hsum(total);
  }
}

// Word-pair decode without pdep (pair path: both words of the pair in one group). A qword broadcast of words w, w + 1
// of plane k puts word w + h in lanes 2m + h; shifting lane 2m + h right by m leaves code 4c + m of word w + h at bit
// 4c. Masking bit 4c and moving plane k to bit 4c + k gives nibble c of each lane = the code of step c, lane l
// (code 32 (l % 2) + 4c + l / 2 of the pair, gemv_input_order(k, 64)). `pair` false: word w + 1 reads as zero.
template <int BITS>
SECATEURS_AVX2 inline __m256i pair_codes(const uint32_t* word, int64_t plane_stride, bool pair) {
  const __m256i shifts = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
  const __m256i ones = _mm256_set1_epi32(0x11111111);
  __m256i codes = _mm256_setzero_si256();
  for (int k = 0; k < BITS; ++k) {
    const uint32_t* w = word + k * plane_stride;
    const __m256i both = pair ? _mm256_castpd_si256(_mm256_broadcast_sd(reinterpret_cast<const double*>(w)))
                              : _mm256_set1_epi64x(int64_t(*w));
    const __m256i bit = _mm256_and_si256(_mm256_srlv_epi32(both, shifts), ones);
    codes = _mm256_or_si256(codes, _mm256_slli_epi32(bit, k));
  }
  return codes;
}

// Step c (0..7) of a pair: nibble c of each lane of `codes` looked up in the group table (vpermps reads bits 0..2 of
// the shifted codes; for 4-bit codes the blend reads bit 3 moved to the sign bit).
template <int BITS, int C>
SECATEURS_AVX2 inline __m256 pair_lookup(__m256i codes, __m256 lo, __m256 hi) {
  const __m256i idx = C == 0 ? codes : _mm256_srli_epi32(codes, 4 * C);
  const __m256 low = _mm256_permutevar8x32_ps(lo, idx);
  if (BITS != 4) return low;
  const __m256i sign = C == 7 ? codes : _mm256_slli_epi32(codes, 28 - 4 * C);
  return _mm256_blendv_ps(low, _mm256_permutevar8x32_ps(hi, idx), _mm256_castsi256_ps(sign));
}

template <int BITS, int NB, int CHAINS, int C>
SECATEURS_AVX2 inline void pair_step(__m256 (&acc)[NB][CHAINS], __m256i codes, __m256 lo, __m256 hi, const float* xp,
                                     int64_t x_stride) {
  const __m256 v = pair_lookup<BITS, C>(codes, lo, hi);
  for (int b = 0; b < NB; ++b)
    acc[b][C % CHAINS] = _mm256_fmadd_ps(v, _mm256_loadu_ps(xp + b * x_stride + 8 * C), acc[b][C % CHAINS]);
}

template <int BITS, int NB, int CHAINS>
SECATEURS_AVX2 inline void accumulate_pair(__m256 (&acc)[NB][CHAINS], const uint32_t* word, int64_t plane_stride,
                                           bool pair, __m256 lo, __m256 hi, const float* xp, int64_t x_stride) {
  const __m256i codes = pair_codes<BITS>(word, plane_stride, pair);
  pair_step<BITS, NB, CHAINS, 0>(acc, codes, lo, hi, xp, x_stride);
  pair_step<BITS, NB, CHAINS, 1>(acc, codes, lo, hi, xp, x_stride);
  pair_step<BITS, NB, CHAINS, 2>(acc, codes, lo, hi, xp, x_stride);
  pair_step<BITS, NB, CHAINS, 3>(acc, codes, lo, hi, xp, x_stride);
  pair_step<BITS, NB, CHAINS, 4>(acc, codes, lo, hi, xp, x_stride);
  pair_step<BITS, NB, CHAINS, 5>(acc, codes, lo, hi, xp, x_stride);
  pair_step<BITS, NB, CHAINS, 6>(acc, codes, lo, hi, xp, x_stride);
  pair_step<BITS, NB, CHAINS, 7>(acc, codes, lo, hi, xp, x_stride);
}

// gemv_row for avx2_gemv_period(p) == 64: x in 64-code periods, word pairs (w even) decoded by pair_codes.
template <int BITS, int NB>
SECATEURS_AVX2 void gemv_row_pairs(const PackedView& p, const float* x, int64_t x_stride, int64_t row, float* y) {
  constexpr int CHAINS = NB == 1 ? 8 : (NB == 2 ? 4 : 2);
  __m256 acc[NB][CHAINS];
  for (int b = 0; b < NB; ++b)
    for (int k = 0; k < CHAINS; ++k) acc[b][k] = _mm256_setzero_ps();
  const int64_t plane_stride = p.out_f * p.words, wpg = words_per_group(p);
  const uint32_t* planes = p.planes + row * p.words;
  prefetch_group_streams(p, row);
  for (int64_t g = 0, w0 = 0; w0 < p.words; ++g, w0 += wpg) {
    __m256 lo, hi;
    load_group_table<BITS>(p, row, g, lo, hi);
    const int64_t w1 = std::min(w0 + wpg, p.words);
    int64_t w = w0;
    for (; w + 2 <= w1; w += 2) {
      if (w % 16 == 0) prefetch_planes<BITS>(planes + w, plane_stride);  // one cache line per plane per 16 words
      accumulate_pair<BITS, NB, CHAINS>(acc, planes + w, plane_stride, true, lo, hi, x + w * kWordBits, x_stride);
    }
    if (w < w1)  // an odd last word (the end of the row)
      accumulate_pair<BITS, NB, CHAINS>(acc, planes + w, plane_stride, false, lo, hi, x + w * kWordBits, x_stride);
  }
  for (int b = 0; b < NB; ++b) {
    __m256 total = acc[b][0];
    for (int k = 1; k < CHAINS; ++k) total = _mm256_add_ps(total, acc[b][k]);
    y[b * p.out_f + row] = hsum(total);
  }
}

template <int BITS>
SECATEURS_AVX2 void gemv_rows_bits(const PackedView& p, const GemvArgs& a, int64_t row_begin, int64_t row_end) {
  const bool pairs = avx2_gemv_period(p) == 64;
  for (int64_t b0 = 0; b0 < a.batch; b0 += kMaxBatchTile) {
    const float* x = a.x + b0 * a.x_stride;
    float* y = a.y + b0 * p.out_f;
    const int64_t nb = std::min<int64_t>(kMaxBatchTile, a.batch - b0);
    for (int64_t o = row_begin; o < row_end; ++o) {
      switch (nb * 2 + pairs) {
        case 2: gemv_row<BITS, 1>(p, x, a.x_stride, o, y); break;
        case 3: gemv_row_pairs<BITS, 1>(p, x, a.x_stride, o, y); break;
        case 4: gemv_row<BITS, 2>(p, x, a.x_stride, o, y); break;
        case 5: gemv_row_pairs<BITS, 2>(p, x, a.x_stride, o, y); break;
        case 6: gemv_row<BITS, 3>(p, x, a.x_stride, o, y); break;
        case 7: gemv_row_pairs<BITS, 3>(p, x, a.x_stride, o, y); break;
        case 8: gemv_row<BITS, 4>(p, x, a.x_stride, o, y); break;
        default: gemv_row_pairs<BITS, 4>(p, x, a.x_stride, o, y); break;
      }
    }
  }
}

template <int BITS>
SECATEURS_AVX2 void dequantize_rows_bits(const PackedView& p, float* out, int64_t row_begin, int64_t row_end) {
  const int64_t plane_stride = p.out_f * p.words, wpg = words_per_group(p);
  alignas(32) float tail[kWordBits];
  for (int64_t o = row_begin; o < row_end; ++o) {
    const uint32_t* planes = p.planes + o * p.words;
    float* row = out + o * p.in_f;
    prefetch_group_streams(p, o);
    for (int64_t g = 0, w0 = 0; w0 < p.words; ++g, w0 += wpg) {
      __m256 lo, hi;
      load_group_table<BITS>(p, o, g, lo, hi);
      for (int64_t w = w0, w1 = std::min(w0 + wpg, p.words); w < w1; ++w) {
        if (w % 16 == 0) prefetch_planes<BITS>(planes + w, plane_stride);
        const __m256i codes = word_codes<BITS>(planes + w, plane_stride);
        const int64_t n = std::min<int64_t>(kWordBits, p.in_f - w * kWordBits);
        float* dst = n == kWordBits ? row + w * kWordBits : tail;  // the ragged last word goes through `tail`
        for (int c = 0; c < 4; ++c) _mm256_storeu_ps(dst + 8 * c, word_lookup<BITS>(codes, c, lo, hi));
        if (n != kWordBits) std::memcpy(row + w * kWordBits, tail, sizeof(float) * size_t(n));
      }
    }
  }
}

}  // namespace

void gemv_rows_avx2(const PackedView& p, const GemvArgs& a, int64_t row_begin, int64_t row_end) {
  switch (p.bits) {
    case 2: gemv_rows_bits<2>(p, a, row_begin, row_end); break;
    case 3: gemv_rows_bits<3>(p, a, row_begin, row_end); break;
    default: gemv_rows_bits<4>(p, a, row_begin, row_end); break;
  }
}

void dequantize_rows_f32_avx2(const PackedView& p, float* out, int64_t row_begin, int64_t row_end) {
  switch (p.bits) {
    case 2: dequantize_rows_bits<2>(p, out, row_begin, row_end); break;
    case 3: dequantize_rows_bits<3>(p, out, row_begin, row_end); break;
    default: dequantize_rows_bits<4>(p, out, row_begin, row_end); break;
  }
}

#else  // not x86-64: the portable kernels serve every input

bool avx2_supported() { return false; }
int avx2_gemv_period(const PackedView&) { return 32; }
int gemv_input_order(int k, int) { return k; }
void gemv_rows_avx2(const PackedView& p, const GemvArgs& a, int64_t b, int64_t e) { gemv_rows_generic(p, a, b, e); }
void dequantize_rows_f32_avx2(const PackedView& p, float* out, int64_t b, int64_t e) {
  dequantize_rows_f32_generic(p, out, b, e);
}

#endif

}  // namespace secateurs_cpu
