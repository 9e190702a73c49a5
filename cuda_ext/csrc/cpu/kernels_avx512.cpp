// AVX-512F variant of the fused GEMV (same decode as kernels_avx2.cpp, 16 lanes): one vpermps over a 16-entry zmm
// table replaces AVX2's two 8-entry lookups and the blend, so the shuffle port stops being the bottleneck. Chosen at
// run time when the CPU has AVX-512F (binding.cpp); dequantisation keeps the AVX2 kernel.
#include <algorithm>

#include "bitplane_cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SECATEURS_X86 1
#define SECATEURS_AVX512 __attribute__((target("avx512f,avx2,fma,bmi2,f16c")))
#else
#define SECATEURS_X86 0
#endif

namespace secateurs_cpu {

int gemv_input_order_avx512(int k) {  // vector c = k / 16, lane l = k % 16 (see lookup16)
  const int c = k / 16, l = k % 16;
  return 16 * c + 8 * (l % 2) + l / 2;
}

#if SECATEURS_X86

bool avx512_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && avx2_supported();
}

namespace {

constexpr uint64_t kNibbleMask = 0x1111111111111111ULL;

template <int BITS>
SECATEURS_AVX512 inline void nibble_codes(const uint32_t* word, int64_t plane_stride, uint64_t nibbles[2]) {
  uint64_t lo = 0, hi = 0;
  for (int k = 0; k < BITS; ++k) {
    const uint32_t bits = word[k * plane_stride];
    lo |= _pdep_u64(bits, kNibbleMask << k);
    hi |= _pdep_u64(bits >> 16, kNibbleMask << k);
  }
  nibbles[0] = lo;
  nibbles[1] = hi;
}

template <int BITS>
SECATEURS_AVX512 inline __m512 load_group_table(const PackedView& p, int64_t row, int64_t group) {
  const int64_t at = row * p.n_groups + group;
  const float* values = p.tables + int64_t(p.type_ids[at]) * (1 << BITS);
  __m512 table = _mm512_maskz_loadu_ps(__mmask16((1u << (1 << BITS)) - 1u), values);
  if (p.zeros != nullptr) table = _mm512_sub_ps(table, _mm512_set1_ps(_cvtsh_ss(p.zeros[at])));
  return _mm512_mul_ps(table, _mm512_set1_ps(_cvtsh_ss(p.scales[at])));
}

// Broadcast one uint64 of nibbles (16 codes) from memory; lane l shifted by 4 * (l / 2) holds code 8 (l % 2) + l / 2.
SECATEURS_AVX512 inline __m512 lookup16(const uint64_t* nibbles, __m512i shifts, __m512 table) {
  const __m512i both = _mm512_castpd_si512(_mm512_broadcastsd_pd(_mm_load_sd(reinterpret_cast<const double*>(nibbles))));
  return _mm512_permutexvar_ps(_mm512_srlv_epi32(both, shifts), table);  // reads the low 4 bits of each lane
}

template <int BITS, int NB>
SECATEURS_AVX512 void gemv_row(const PackedView& p, const float* x, int64_t x_stride, int64_t row, float* y) {
  constexpr int CHAINS = NB == 1 ? 2 : 1;
  __m512 acc[NB][CHAINS];
  for (int b = 0; b < NB; ++b)
    for (int k = 0; k < CHAINS; ++k) acc[b][k] = _mm512_setzero_ps();
  const __m512i shifts = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const int64_t plane_stride = p.out_f * p.words;
  const int64_t wpg = p.n_groups == 1 ? p.words : p.group_size / kWordBits;
  const uint32_t* planes = p.planes + row * p.words;
  for (int64_t g = 0, w0 = 0; w0 < p.words; ++g, w0 += wpg) {
    const __m512 table = load_group_table<BITS>(p, row, g);
    for (int64_t w = w0, w1 = std::min(w0 + wpg, p.words); w < w1; ++w) {
      alignas(16) uint64_t nibbles[2];
      nibble_codes<BITS>(planes + w, plane_stride, nibbles);
      const float* xw = x + w * kWordBits;
      for (int c = 0; c < 2; ++c) {
        const __m512 v = lookup16(nibbles + c, shifts, table);
        for (int b = 0; b < NB; ++b)
          acc[b][c % CHAINS] = _mm512_fmadd_ps(v, _mm512_loadu_ps(xw + b * x_stride + 16 * c), acc[b][c % CHAINS]);
      }
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
  for (int64_t b0 = 0; b0 < a.batch; b0 += kTile) {
    const float* x = a.x + b0 * a.x_stride;
    float* y = a.y + b0 * p.out_f;
    const int64_t nb = std::min<int64_t>(kTile, a.batch - b0);
    for (int64_t o = row_begin; o < row_end; ++o) {
      switch (nb) {
        case 1: gemv_row<BITS, 1>(p, x, a.x_stride, o, y); break;
        case 2: gemv_row<BITS, 2>(p, x, a.x_stride, o, y); break;
        case 3: gemv_row<BITS, 3>(p, x, a.x_stride, o, y); break;
        case 4: gemv_row<BITS, 4>(p, x, a.x_stride, o, y); break;
        case 5: gemv_row<BITS, 5>(p, x, a.x_stride, o, y); break;
        case 6: gemv_row<BITS, 6>(p, x, a.x_stride, o, y); break;
        case 7: gemv_row<BITS, 7>(p, x, a.x_stride, o, y); break;
        default: gemv_row<BITS, 8>(p, x, a.x_stride, o, y); break;
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
