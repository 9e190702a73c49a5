// CPU kernels of the bit-plane weight format (cuda_ext/reference.py is the spec and the oracle).
//
// Layout (in memory, unchanged): planes int32 [bits, out, words = ceil(in/32)], bit i of planes[k, o, w] = bit k of
// code (o, 32w + i); type_ids uint8 [out, n_groups]; scales / zeros fp16 [out, n_groups] (zeros optional);
// tables fp32 [n_types, 2**bits]. w[o, i] = (tables[t, c] - z) * s in fp32 (t, z, s of group i / G).
//
// Every kernel works on a range of output rows [row_begin, row_end) so that binding.cpp can split rows over
// at::parallel_for; a row's arithmetic never depends on the split, so results are identical for any thread count.
#pragma once

#include <cstdint>

namespace secateurs_cpu {

constexpr int kWordBits = 32;
constexpr int kMaxBatchTile = 4;  // activation rows per pass of the fused GEMV (register budget of AVX2)
constexpr int kChunkCodes = 512;  // codes per step of the AVX-512 GEMV (16 words of each plane)

struct PackedView {
  const uint32_t* planes;   // [bits, out, words]
  const uint8_t* type_ids;  // [out, n_groups]
  const uint16_t* scales;   // fp16 bit patterns [out, n_groups]
  const uint16_t* zeros;    // fp16 bit patterns [out, n_groups] or nullptr
  const float* tables;      // [n_types, 2**bits]
  int bits;
  int64_t out_f, in_f, words, group_size, n_groups;
};

// x: fp32 [batch, x_stride] (zero-padded beyond in_f to whole words, for AVX-512 to whole 512-code chunks), y: fp32 [batch, out_f]; y[b, o] = sum_i x[b, i] w[o, i].
struct GemvArgs {
  const float* x;
  int64_t x_stride;
  int64_t batch;
  float* y;
};

float half_to_float(uint16_t h);

// The per-group table (tables[t, c] - z) * s for c < 2**bits, exactly the reference's fp32 arithmetic.
void group_table(const PackedView& p, int64_t row, int64_t group, float* table);

// Portable kernels: any bits in {2, 3, 4, 8}, any group size.
void gemv_rows_generic(const PackedView& p, const GemvArgs& a, int64_t row_begin, int64_t row_end);
void dequantize_rows_f32_generic(const PackedView& p, float* out, int64_t row_begin, int64_t row_end);

// AVX2 + FMA + F16C kernels (runtime-dispatched): bits in {2, 3, 4}, each 32-code word inside one group
// (group_size % 32 == 0 or a single group per row). Callers check avx2_supported() and avx2_covers() first.
bool avx2_supported();
bool avx2_covers(const PackedView& p);
// The AVX2 GEMV reads x in periods of avx2_gemv_period(p) codes (64: word pairs, when a pair never straddles a group;
// else 32: single words) in a permuted order: slot k of a period holds x[start + gemv_input_order(k, period)].
int avx2_gemv_period(const PackedView& p);
int gemv_input_order(int k, int period);
void gemv_rows_avx2(const PackedView& p, const GemvArgs& a, int64_t row_begin, int64_t row_end);
void dequantize_rows_f32_avx2(const PackedView& p, float* out, int64_t row_begin, int64_t row_end);

// AVX-512 (F, BW) + GFNI GEMV (kernels_avx512.cpp): bits in {2, 3, 4}, group sizes of 128k codes or one group per
// row (avx512_covers). It reads x in 512-code chunks: slot k of chunk c holds x[512 c + gemv_input_order_avx512(k)].
bool avx512_supported();
bool avx512_covers(const PackedView& p);
int gemv_input_order_avx512(int k);
void gemv_rows_avx512(const PackedView& p, const GemvArgs& a, int64_t row_begin, int64_t row_end);

}  // namespace secateurs_cpu
