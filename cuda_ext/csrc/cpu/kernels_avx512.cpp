// AVX-512 (F + BW) + GFNI variant of the fused GEMV, chosen at run time (binding.cpp); dequantisation keeps the AVX2
// kernel. Decoding without pdep: for 16 words of a row at once, byte-interleave the 4 planes (vpunpck*) so that
// each 64-bit lane holds [P3, P2, P1, P0] bytes j and j + 1 of one word, then one GF(2) affine transform
// (vgf2p8affineqb with the matrix operand = the data) transposes every 8 x 8 bit block: byte i of the lane then
// holds code 8(j + 1) + i in its low nibble and code 8j + i in its high nibble. Per word: one vpmovzxbd, one shift
// and two 16-entry vpermps lookups in the per-group table (tables[t, c] - z) * s.
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

int gemv_input_order_avx512(int k) {  // vector c = k / 16, lane m = k % 16 (see gemv_row)
  const int c = k / 16, m = k % 16;
  return 16 * (m / 8) + (c == 0 ? 8 : 0) + m % 8;
}

#if SECATEURS_X86

bool avx512_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("gfni") &&
         avx2_supported();
}

namespace {

constexpr int64_t kChunkWords = 16;  // words per zmm of one plane
constexpr int64_t kChunkBytes = 256;  // their codes as nibbles

// Nibble blocks of words [w0, w0 + n) of one row (n <= 16) into out[0, 256): word w0 + 4L + r at byte 64 r + 16 L.
template <int BITS>
SECATEURS_AVX512 inline void transpose_chunk(const uint32_t* row, int64_t plane_stride, int64_t w0, int64_t n,
                                             uint8_t* out) {
  const __mmask16 valid = n >= kChunkWords ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u);
  __m512i v[4];
  for (int k = 0; k < 4; ++k)
    v[k] = k < BITS ? _mm512_maskz_loadu_epi32(valid, row + k * plane_stride + w0) : _mm512_setzero_si512();
  const __m512i lo10 = _mm512_unpacklo_epi8(v[1], v[0]), hi10 = _mm512_unpackhi_epi8(v[1], v[0]);
  const __m512i lo32 = _mm512_unpacklo_epi8(v[3], v[2]), hi32 = _mm512_unpackhi_epi8(v[3], v[2]);
  const __m512i quads[4] = {_mm512_unpacklo_epi16(lo32, lo10), _mm512_unpackhi_epi16(lo32, lo10),
                            _mm512_unpacklo_epi16(hi32, hi10), _mm512_unpackhi_epi16(hi32, hi10)};
  const __m512i unit_bytes = _mm512_set1_epi64(int64_t(0x8040201008040201ULL));  // byte i = 1 << i
  for (int r = 0; r < 4; ++r)  // out byte i, bit k = bit i of data byte 7 - k: an 8 x 8 bit transpose
    _mm512_storeu_si512(out + 64 * r, _mm512_gf2p8affine_epi64_epi8(unit_bytes, quads[r], 0));
}

inline const uint8_t* word_block(const uint8_t* blocks, int64_t w) {
  const int64_t local = w % kChunkWords;
  return blocks + (w / kChunkWords) * kChunkBytes + (local % 4) * 64 + (local / 4) * 16;
}

template <int BITS>
SECATEURS_AVX512 inline __m512 load_group_table(const PackedView& p, int64_t row, int64_t group) {
  const int64_t at = row * p.n_groups + group;
  const float* values = p.tables + int64_t(p.type_ids[at]) * (1 << BITS);
  __m512 table = _mm512_maskz_loadu_ps(__mmask16((1u << (1 << BITS)) - 1u), values);
  if (p.zeros != nullptr) table = _mm512_sub_ps(table, _mm512_set1_ps(_cvtsh_ss(p.zeros[at])));
  return _mm512_mul_ps(table, _mm512_set1_ps(_cvtsh_ss(p.scales[at])));
}

// acc[b][C0] += w[16 codes] * x, acc[b][C1] += w[16 more] * x for one word; compile-time chains keep acc in registers.
template <int NB, int CHAINS, int C0, int C1>
SECATEURS_AVX512 inline void accumulate_word(__m512 (&acc)[NB][CHAINS], const uint8_t* blocks, int64_t w, __m512 table,
                                             const float* x, int64_t x_stride) {
  const __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(word_block(blocks, w))));
  const __m512 upper = _mm512_permutexvar_ps(codes, table);  // lane 8h + i: code 16h + 8 + i (low nibble)
  const __m512 lower = _mm512_permutexvar_ps(_mm512_srli_epi32(codes, 4), table);  // code 16h + i
  const float* xw = x + w * kWordBits;
  for (int b = 0; b < NB; ++b) {
    acc[b][C0] = _mm512_fmadd_ps(upper, _mm512_loadu_ps(xw + b * x_stride), acc[b][C0]);
    acc[b][C1] = _mm512_fmadd_ps(lower, _mm512_loadu_ps(xw + b * x_stride + 16), acc[b][C1]);
  }
}

// y[b, row] for NB activation rows; `blocks` is scratch of ceil(words / 16) * 256 bytes.
template <int BITS, int NB>
SECATEURS_AVX512 void gemv_row(const PackedView& p, const float* x, int64_t x_stride, int64_t row, float* y,
                               uint8_t* blocks) {
  constexpr int CHAINS = NB <= 2 ? 4 : (NB <= 4 ? 2 : 1);  // independent accumulators: FMA latency is 4 cycles
  __m512 acc[NB][CHAINS];
  for (int b = 0; b < NB; ++b)
    for (int k = 0; k < CHAINS; ++k) acc[b][k] = _mm512_setzero_ps();
  const int64_t plane_stride = p.out_f * p.words;
  const int64_t wpg = p.n_groups == 1 ? p.words : p.group_size / kWordBits;
  const uint32_t* planes = p.planes + row * p.words;
  for (int64_t w0 = 0; w0 < p.words; w0 += kChunkWords)
    transpose_chunk<BITS>(planes, plane_stride, w0, p.words - w0, blocks + (w0 / kChunkWords) * kChunkBytes);
  for (int64_t g = 0, w0 = 0; w0 < p.words; ++g, w0 += wpg) {
    const __m512 table = load_group_table<BITS>(p, row, g);
    const int64_t w1 = std::min(w0 + wpg, p.words);
    int64_t w = w0;
    for (; w + 2 <= w1; w += 2) {
      accumulate_word<NB, CHAINS, 0, 1 % CHAINS>(acc, blocks, w, table, x, x_stride);
      accumulate_word<NB, CHAINS, 2 % CHAINS, 3 % CHAINS>(acc, blocks, w + 1, table, x, x_stride);
    }
    if (w < w1) accumulate_word<NB, CHAINS, 0, 1 % CHAINS>(acc, blocks, w, table, x, x_stride);
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
  std::vector<uint8_t> scratch(size_t((p.words + kChunkWords - 1) / kChunkWords * kChunkBytes));
  uint8_t* blocks = scratch.data();
  for (int64_t b0 = 0; b0 < a.batch; b0 += kTile) {
    const float* x = a.x + b0 * a.x_stride;
    float* y = a.y + b0 * p.out_f;
    const int64_t nb = std::min<int64_t>(kTile, a.batch - b0);
    for (int64_t o = row_begin; o < row_end; ++o) {
      switch (nb) {
        case 1: gemv_row<BITS, 1>(p, x, a.x_stride, o, y, blocks); break;
        case 2: gemv_row<BITS, 2>(p, x, a.x_stride, o, y, blocks); break;
        case 3: gemv_row<BITS, 3>(p, x, a.x_stride, o, y, blocks); break;
        case 4: gemv_row<BITS, 4>(p, x, a.x_stride, o, y, blocks); break;
        case 5: gemv_row<BITS, 5>(p, x, a.x_stride, o, y, blocks); break;
        case 6: gemv_row<BITS, 6>(p, x, a.x_stride, o, y, blocks); break;
        case 7: gemv_row<BITS, 7>(p, x, a.x_stride, o, y, blocks); break;
        default: gemv_row<BITS, 8>(p, x, a.x_stride, o, y, blocks); break;
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
