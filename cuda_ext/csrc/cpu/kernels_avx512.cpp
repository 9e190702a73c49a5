// AVX-512 (F, BW) + GFNI fused GEMV, chosen at run time (binding.cpp); dequantisation keeps the AVX2 kernel.
//
// A row is read in chunks of 16 words (512 codes) of each plane, decoded in registers, never stored:
//  1. One zmm load per plane (16 words), a 4 x 4 dword transpose (vpermd), so that 128-bit lane L of quad r will hold
//     word 4r + L: the 4 words of quad r are one group for group sizes of 128k (or the row's only group).
//  2. Byte-interleave the planes (vpunpck*): each 64-bit lane holds [P3, P2, P1, P0] of bytes j and j + 1 of one word;
//     one GF(2) affine transform (vgf2p8affineqb) transposes every 8 x 8 bit block, so each dword holds 8 codes as
//     nibbles.
//  3. Per quad: the group's table (tables[t, c] - z) * s in one zmm; per nibble position s: shift by 4s, vpermps (it
//     reads the low 4 bits of each index), FMA with x. x is fed in the matching order (gemv_input_order_avx512).
// Per 16 weights: one shift, one vpermps, one FMA per activation row; ~0.4 more ops per 16 weights for steps 1-2.
#include <algorithm>
#include <vector>

#include "bitplane_cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SECATEURS_X86 1
#define SECATEURS_AVX512 __attribute__((target("avx512f,avx512bw,gfni,avx2,fma,f16c")))
#else
#define SECATEURS_X86 0
#endif

namespace secateurs_cpu {

// Slot k of a 512-code chunk (quad r = k / 128, shift s = k / 16 % 8, lane 4L + d = k % 16) holds code
// 32 (4r + L) + 16 (d / 2) + 8 [s even] + 4 (d % 2) + s / 2 of the chunk (see the header comment).
int gemv_input_order_avx512(int k) {
  const int r = k / 128, s = k / 16 % 8, lane = k % 16, L = lane / 4, d = lane % 4;
  return 32 * (4 * r + L) + 16 * (d / 2) + (s % 2 == 0 ? 8 : 0) + 4 * (d % 2) + s / 2;
}

bool avx512_covers(const PackedView& p) {
  const int64_t wpg = p.group_size / kWordBits;
  const bool quads_in_one_group = p.n_groups == 1 || (p.group_size % kWordBits == 0 && wpg % 4 == 0);
  return (p.bits == 2 || p.bits == 3 || p.bits == 4) && quads_in_one_group;
}

#if SECATEURS_X86

bool avx512_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("gfni") &&
         avx2_supported();
}

namespace {

// Software prefetch distances: the hardware prefetchers start late on the short rows of small layers (a 576-input
// row is 72 bytes of each plane), so the kernel was waiting on memory when a model's layers run one after another.
constexpr int64_t kPrefetchBytes = 2048;  // ahead in each plane's stream
constexpr int64_t kPrefetchRows = 16;  // ahead in the type id / scale / zero streams

// Codes of words [w0, w0 + n) of one row (n <= 16; missing words read as code 0): quads[r] lane L = word w0 + 4r + L.
template <int BITS>
SECATEURS_AVX512 inline void decode_chunk(const uint32_t* row, int64_t plane_stride, int64_t w0, int64_t n,
                                          __m512i (&quads)[4]) {
  const __mmask16 valid = n >= kChunkCodes / kWordBits ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u);
  const __m512i transpose = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  __m512i v[4];
  for (int k = 0; k < 4; ++k)
    v[k] = k < BITS ? _mm512_permutexvar_epi32(transpose, _mm512_maskz_loadu_epi32(valid, row + k * plane_stride + w0))
                    : _mm512_setzero_si512();
  const __m512i lo10 = _mm512_unpacklo_epi8(v[1], v[0]), hi10 = _mm512_unpackhi_epi8(v[1], v[0]);
  const __m512i lo32 = _mm512_unpacklo_epi8(v[3], v[2]), hi32 = _mm512_unpackhi_epi8(v[3], v[2]);
  const __m512i unit_bytes = _mm512_set1_epi64(int64_t(0x8040201008040201ULL));  // byte i = 1 << i
  // out byte i, bit k = bit i of data byte 7 - k: an 8 x 8 bit transpose
  if (n <= 4) {  // the row's last words: quad 0 only
    quads[0] = _mm512_gf2p8affine_epi64_epi8(unit_bytes, _mm512_unpacklo_epi16(lo32, lo10), 0);
    return;
  }
  quads[0] = _mm512_gf2p8affine_epi64_epi8(unit_bytes, _mm512_unpacklo_epi16(lo32, lo10), 0);
  quads[1] = _mm512_gf2p8affine_epi64_epi8(unit_bytes, _mm512_unpackhi_epi16(lo32, lo10), 0);
  quads[2] = _mm512_gf2p8affine_epi64_epi8(unit_bytes, _mm512_unpacklo_epi16(hi32, hi10), 0);
  quads[3] = _mm512_gf2p8affine_epi64_epi8(unit_bytes, _mm512_unpackhi_epi16(hi32, hi10), 0);
}

// fp16 -> fp32 of n values (vcvtph2ps, 16 at a time): a row's scales or zeros, converted once per row. dst holds
// whole 16-float blocks: unmasked stores, which later scalar loads can forward from (masked ones cannot).
SECATEURS_AVX512 inline void halves_to_floats(const uint16_t* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1u);
    const __m512i h = _mm512_maskz_loadu_epi16(__mmask32(m), src + i);  // 16 halves in the low 256 bits
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm512_castsi512_si256(h)));
  }
}

// The group's table (tables[t, c] - z) * s (exactly the reference's fp32 arithmetic); s, z: the row's fp32 values.
template <int BITS>
SECATEURS_AVX512 inline __m512 load_group_table(const PackedView& p, int64_t row, int64_t group, const float* s,
                                                const float* z) {
  const float* values = p.tables + int64_t(p.type_ids[row * p.n_groups + group]) * (1 << BITS);
  __m512 table = BITS == 4 ? _mm512_loadu_ps(values) : _mm512_maskz_loadu_ps(__mmask16((1u << (1 << BITS)) - 1u), values);
  if (z != nullptr) table = _mm512_sub_ps(table, _mm512_set1_ps(z[group]));
  return _mm512_mul_ps(table, _mm512_set1_ps(s[group]));
}

// acc[b][s % CHAINS] += w * x over the 128 codes of one quad (8 nibble positions x 16 lanes).
template <int NB, int CHAINS>
SECATEURS_AVX512 inline void accumulate_quad(__m512 (&acc)[NB][CHAINS], __m512i quad, __m512 table, const float* x,
                                             int64_t x_stride) {
#pragma GCC unroll 8
  for (int s = 0; s < 8; ++s) {
    const __m512 w = _mm512_permutexvar_ps(s == 0 ? quad : _mm512_srli_epi32(quad, 4 * s), table);
    for (int b = 0; b < NB; ++b)
      acc[b][s % CHAINS] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + b * x_stride + 16 * s), acc[b][s % CHAINS]);
  }
}

// y[b, row] for NB activation rows starting at x (chunk-ordered, zero-padded to whole chunks).
template <int BITS, int NB>
SECATEURS_AVX512 void gemv_row(const PackedView& p, const float* x, int64_t x_stride, int64_t row, float* y,
                               float* row_scales) {
  constexpr int CHAINS = NB == 1 ? 4 : (NB == 2 ? 2 : 1);  // independent accumulators: FMA latency is 4 cycles
  __m512 acc[NB][CHAINS];
  for (int b = 0; b < NB; ++b)
    for (int k = 0; k < CHAINS; ++k) acc[b][k] = _mm512_setzero_ps();
  const int64_t plane_stride = p.out_f * p.words;
  const int64_t wpg = p.n_groups == 1 ? p.words : p.group_size / kWordBits;  // a multiple of 4 unless one group
  const uint32_t* planes = p.planes + row * p.words;
  float* zeros = p.zeros != nullptr ? row_scales + (p.n_groups + 15) / 16 * 16 : nullptr;
  const int64_t ahead = kPrefetchRows * p.n_groups;  // the per-group streams of a row kPrefetchRows later
  _mm_prefetch(reinterpret_cast<const char*>(p.scales + row * p.n_groups + ahead), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(p.type_ids + row * p.n_groups + ahead), _MM_HINT_T0);
  if (zeros != nullptr) _mm_prefetch(reinterpret_cast<const char*>(p.zeros + row * p.n_groups + ahead), _MM_HINT_T0);
  halves_to_floats(p.scales + row * p.n_groups, p.n_groups, row_scales);
  if (zeros != nullptr) halves_to_floats(p.zeros + row * p.n_groups, p.n_groups, zeros);
  for (int64_t w0 = 0; w0 < p.words; w0 += kChunkCodes / kWordBits) {
    __m512i quads[4];
    const int64_t n = p.words - w0;
    for (int k = 0; k < BITS; ++k)  // each plane is one sequential stream over (row, word): one line per chunk
      _mm_prefetch(reinterpret_cast<const char*>(planes + k * plane_stride + w0) + kPrefetchBytes, _MM_HINT_T0);
    decode_chunk<BITS>(planes, plane_stride, w0, n, quads);
    const float* xc = x + w0 * kWordBits;
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      if (4 * r >= n) break;  // quads past the row's last word
      const __m512 table = load_group_table<BITS>(p, row, p.n_groups == 1 ? 0 : (w0 + 4 * r) / wpg, row_scales, zeros);
      accumulate_quad<NB, CHAINS>(acc, quads[r], table, xc + 128 * r, x_stride);
    }
  }
  for (int b = 0; b < NB; ++b) {
    __m512 total = acc[b][0];
    for (int k = 1; k < CHAINS; ++k) total = _mm512_add_ps(total, acc[b][k]);
    y[b * p.out_f + row] = _mm512_reduce_add_ps(total);
  }
}

template <int BITS>
SECATEURS_AVX512 void gemv_rows_bits(const PackedView& p, const GemvArgs& a, int64_t row_begin, int64_t row_end) {
  constexpr int64_t kTile = 8;  // 32 zmm registers hold 8 accumulators easily
  std::vector<float> row_scales(size_t(2 * ((p.n_groups + 15) / 16 * 16)));  // a row's scales, then zeros (fp32)
  // the first rows' streams, which the in-loop prefetches (kPrefetchBytes / kPrefetchRows ahead) do not cover
  const char* first_words = reinterpret_cast<const char*>(p.planes + row_begin * p.words);
  const int64_t first_bytes = std::min<int64_t>(kPrefetchBytes, (row_end - row_begin) * p.words * 4);
  for (int k = 0; k < BITS; ++k)
    for (int64_t at = 0; at < first_bytes; at += 64) _mm_prefetch(first_words + k * p.out_f * p.words * 4 + at, _MM_HINT_T0);
  const int64_t first_groups = std::min<int64_t>(kPrefetchRows, row_end - row_begin) * p.n_groups;
  for (int64_t at = 0; at < first_groups; at += 32) {
    _mm_prefetch(reinterpret_cast<const char*>(p.scales + row_begin * p.n_groups + at), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(p.type_ids + row_begin * p.n_groups + at), _MM_HINT_T0);
  }
  for (int64_t b0 = 0; b0 < a.batch; b0 += kTile) {
    const float* x = a.x + b0 * a.x_stride;
    float* y = a.y + b0 * p.out_f;
    const int64_t nb = std::min<int64_t>(kTile, a.batch - b0);
    for (int64_t o = row_begin; o < row_end; ++o) {
      switch (nb) {
        case 1: gemv_row<BITS, 1>(p, x, a.x_stride, o, y, row_scales.data()); break;
        case 2: gemv_row<BITS, 2>(p, x, a.x_stride, o, y, row_scales.data()); break;
        case 3: gemv_row<BITS, 3>(p, x, a.x_stride, o, y, row_scales.data()); break;
        case 4: gemv_row<BITS, 4>(p, x, a.x_stride, o, y, row_scales.data()); break;
        case 5: gemv_row<BITS, 5>(p, x, a.x_stride, o, y, row_scales.data()); break;
        case 6: gemv_row<BITS, 6>(p, x, a.x_stride, o, y, row_scales.data()); break;
        case 7: gemv_row<BITS, 7>(p, x, a.x_stride, o, y, row_scales.data()); break;
        default: gemv_row<BITS, 8>(p, x, a.x_stride, o, y, row_scales.data()); break;
      }
    }
  }
}

}  // namespace

void gemv_rows_avx512(const PackedView& p, const GemvArgs& a, int64_t row_begin, int64_t row_end) {
  switch (p.bits) {
    case 2: gemv_rows_bits<2>(p, a, row_begin, row_end); break;
    case 3: gemv_rows_bits<3>(p, a, row_begin, row_end); break;
    default: gemv_rows_bits<4>(p, a, row_begin, row_end); break;
  }
}

#else

bool avx512_supported() { return false; }
void gemv_rows_avx512(const PackedView& p, const GemvArgs& a, int64_t b, int64_t e) { gemv_rows_generic(p, a, b, e); }

#endif

}  // namespace secateurs_cpu
