// Portable (scalar C++) CPU kernels: every bit width and group size the format allows. They are the fallback when
// the AVX2 kernels do not cover an input (8-bit codes, a group size that splits a 32-code word) or the CPU lacks
// AVX2/FMA/BMI2, and the reference for the AVX2 ones' per-group tables.
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "bitplane_cpu.h"

namespace secateurs_cpu {

float half_to_float(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }

void group_table(const PackedView& p, int64_t row, int64_t group, float* table) {
  const int64_t at = row * p.n_groups + group;
  const int n_codes = 1 << p.bits;
  const float* values = p.tables + int64_t(p.type_ids[at]) * n_codes;
  const float scale = half_to_float(p.scales[at]);
  if (p.zeros != nullptr) {
    const float zero = half_to_float(p.zeros[at]);
    for (int c = 0; c < n_codes; ++c) table[c] = (values[c] - zero) * scale;  // reference: (v - z) * s
  } else {
    for (int c = 0; c < n_codes; ++c) table[c] = values[c] * scale;  // reference: v * s (no zero term)
  }
}

namespace {

// Codes of one 32-code word: code i = sum_k bit i of planes[k, row, word] << k.
void decode_word(const PackedView& p, int64_t row, int64_t word, uint16_t* codes) {
  const int64_t plane_stride = p.out_f * p.words;
  const uint32_t* at = p.planes + row * p.words + word;
  std::fill(codes, codes + kWordBits, uint16_t(0));
  for (int k = 0; k < p.bits; ++k) {
    const uint32_t bits = at[k * plane_stride];
    for (int i = 0; i < kWordBits; ++i) codes[i] |= uint16_t(((bits >> i) & 1u) << k);
  }
}

// Calls fn(i, code, table) for every input i < in_f of one row, the table being that of i's group.
template <typename Fn>
void for_each_weight(const PackedView& p, int64_t row, Fn fn) {
  std::vector<float> table(size_t(1) << p.bits);
  uint16_t codes[kWordBits];
  int64_t group = -1;
  for (int64_t w = 0; w < p.words; ++w) {
    decode_word(p, row, w, codes);
    const int64_t n = std::min<int64_t>(kWordBits, p.in_f - w * kWordBits);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t i = w * kWordBits + j;
      if (i / p.group_size != group) {
        group = i / p.group_size;
        group_table(p, row, group, table.data());
      }
      fn(i, codes[j], table.data());
    }
  }
}

}  // namespace

void gemv_rows_generic(const PackedView& p, const GemvArgs& a, int64_t row_begin, int64_t row_end) {
  std::vector<float> acc(a.batch);
  for (int64_t o = row_begin; o < row_end; ++o) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for_each_weight(p, o, [&](int64_t i, uint16_t code, const float* table) {
      const float w = table[code];
      for (int64_t b = 0; b < a.batch; ++b) acc[b] += a.x[b * a.x_stride + i] * w;
    });
    for (int64_t b = 0; b < a.batch; ++b) a.y[b * p.out_f + o] = acc[b];
  }
}

void dequantize_rows_f32_generic(const PackedView& p, float* out, int64_t row_begin, int64_t row_end) {
  for (int64_t o = row_begin; o < row_end; ++o) {
    float* row = out + o * p.in_f;
    for_each_weight(p, o, [&](int64_t i, uint16_t code, const float* table) { row[i] = table[code]; });
  }
}

}  // namespace secateurs_cpu
