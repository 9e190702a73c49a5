// Bit-plane weight format: dequantisation and fused dequant + GEMV kernels (CUDA runtime only, no torch).
//
// Format (cuda_ext/reference.py is the oracle and the spec):
//   planes   int32 [bits, out, W], W = ceil(in/32); bit i of planes[k, o, w] = bit k of codes[o, 32w + i]
//   type_ids uint8 [out, n_groups]; scales, zeros fp16 [out, n_groups] (zeros optional); n_groups = ceil(in/G)
//   tables   fp32 [n_types <= 4, 2**bits]
//   w[o, i] = (tables[type_ids[o, i/G], code] - zeros[o, i/G]) * float(scales[o, i/G]), fp32, then one RNE cast.
//
// The part above `#if defined(__CUDACC__) ...` is plain C++: the torch binding (host compiler) includes it.
// SECATEURS_HOST_EMULATION compiles the kernels as host code for the CPU emulation test.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#define SECATEURS_MAX_TYPES 4
#define SECATEURS_MAX_GEMV_BATCH 8

#ifdef __cplusplus
extern "C" {
#endif

// Element types of dense outputs and activations.
enum SecateursDtype { SECATEURS_F16 = 0, SECATEURS_BF16 = 1, SECATEURS_F32 = 2 };

// w = dequant(planes ...) -> dst [out, in] of `out_dtype` (F16, BF16 or F32), bit-exact vs the reference.
// `zeros` may be NULL. group_size must be a multiple of 32 or >= in_features.
cudaError_t secateurs_dequantize(const int32_t* planes, const uint8_t* type_ids, const void* scales,
                                 const void* zeros, const float* tables, int n_types, int bits,
                                 int64_t out_features, int64_t in_features, int64_t group_size,
                                 int out_dtype, void* dst, cudaStream_t stream);

// y [batch, out] = x [batch, in] @ dequant(planes ...)^T, fp32 accumulation, 1 <= batch <= 8.
// x and y share `x_dtype` (F16 or BF16). Weights enter the products unrounded (fp32), so y differs from
// x @ (W rounded to x_dtype)^T by that rounding at most. cudaErrorInvalidConfiguration: the activation tile
// does not fit the device's shared memory (batch 8 needs ~150 KB); the caller then dequantises + GEMM.
// Both: type ids must be < n_types (larger ids are masked to 2 bits: wrong values, no bad access).
cudaError_t secateurs_quant_gemv(const void* x, int64_t batch, const int32_t* planes, const uint8_t* type_ids,
                                 const void* scales, const void* zeros, const float* tables, int n_types,
                                 int bits, int64_t out_features, int64_t in_features, int64_t group_size,
                                 int x_dtype, void* y, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

namespace secateurs {

// Launch geometry, shared by the launchers and the CPU emulation test (tests/cuda_ext/test_compile.py).

// Per-lane table stride (floats) of the GEMV: see lane_table_offset.
constexpr int kLaneTableStride = 64;

template <int BITS, int NB>
struct GemvShape {
  static constexpr int kWarps = 4;
  static constexpr int kBaseRows = BITS == 8 ? 2 : 4;
  static constexpr int kRows = NB >= 4 ? (kBaseRows / 2) : kBaseRows;  // keep registers for the batch
  static constexpr bool kLaneTable = BITS <= 4;
  static constexpr int kTableFloats =
      kLaneTable ? (SECATEURS_MAX_TYPES << BITS) * kLaneTableStride : (SECATEURS_MAX_TYPES << BITS);
  static constexpr int kChunkWords = 128;  // words per warp iteration: 32 lanes x 4
  // Blocks per SM for __launch_bounds__: 4 caps registers at 128; these shapes spill there (ptxas -v), so
  // they get 3 (168 registers).
  static constexpr int kMinBlocks = (BITS == 4 && NB <= 2) || (BITS == 8 && NB == 8) ? 3 : 4;
};

// Group of word w is w / words_per_group: G / 32, or (per channel, G >= in) n_words, so that every word of
// the row is in group 0.
inline uint32_t words_per_group(int64_t in_f, int64_t group_size) {
  const int64_t n_words = (in_f + 31) / 32;
  return uint32_t(group_size >= in_f ? (n_words > 1 ? n_words : 1) : group_size / 32);
}

struct DequantPlan {
  unsigned grid_x, grid_y;  // chunks of 8 codes / 256 threads; rows (grid-stride beyond 65535)
  size_t smem_bytes;        // the tables, [4, 2**bits] fp32
  bool vec_store;           // in % 8 == 0 and dst 16-byte aligned
};

inline DequantPlan plan_dequant(int bits, int64_t out_f, int64_t in_f, const void* dst) {
  const int64_t chunks = (in_f + 7) / 8;
  return {unsigned((chunks + 255) / 256), unsigned(out_f < 65535 ? out_f : 65535),
          (size_t(SECATEURS_MAX_TYPES) << bits) * sizeof(float),
          in_f % 8 == 0 && reinterpret_cast<uintptr_t>(dst) % 16 == 0};
}

struct GemvPlan {
  int64_t tile_words;  // activation words staged per pass (multiple of 128); 0 = does not fit in shared memory
  size_t smem_bytes;   // dynamic shared memory: lane table + NB x tile_words x (32 activations + their sum)
  unsigned blocks;     // ceil(out / rows per block)
  bool vec_load;       // 16-byte plane loads: n_words % 4 == 0 and planes 16-byte aligned
};

// Above this the GEMV tiles the activations instead of staging all of `in` (about 4 blocks per SM).
constexpr size_t kGemvPreferredSmem = 64 * 1024;

template <int BITS, int NB>
GemvPlan plan_gemv(int64_t out_f, int64_t in_f, const void* planes, size_t max_smem) {
  using S = GemvShape<BITS, NB>;
  const int64_t chunk = S::kChunkWords;
  const int64_t n_words = (in_f + 31) / 32;
  const size_t table_bytes = S::kTableFloats * sizeof(float);
  const size_t word_bytes = size_t(NB) * (32 + 1) * sizeof(float);
  const size_t least = table_bytes + chunk * word_bytes;
  size_t budget = kGemvPreferredSmem > least ? kGemvPreferredSmem : least;
  budget = budget < max_smem ? budget : max_smem;
  const int64_t rows_per_block = int64_t(S::kWarps) * S::kRows;
  GemvPlan plan{0, 0, unsigned((out_f + rows_per_block - 1) / rows_per_block),
                n_words % 4 == 0 && reinterpret_cast<uintptr_t>(planes) % 16 == 0};
  if (least > max_smem) return plan;
  const int64_t fit = int64_t((budget - table_bytes) / word_bytes) / chunk * chunk;
  const int64_t all = (n_words + chunk - 1) / chunk * chunk;
  plan.tile_words = fit < all ? fit : all;
  if (plan.tile_words < chunk) plan.tile_words = chunk;  // in == 0
  plan.smem_bytes = table_bytes + size_t(plan.tile_words) * word_bytes;
  return plan;
}

}  // namespace secateurs

#if defined(__CUDACC__) || defined(SECATEURS_HOST_EMULATION)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace secateurs {

// ---------------------------------------------------------------------------------------------------------
// Bit tricks (__host__ __device__: the CPU emulation test runs them too).

// __byte_perm(x, y, s): byte n of the result is byte (s >> 4n) & 7 of the 8-byte value {y:x}.
__host__ __device__ __forceinline__ uint32_t byte_perm(uint32_t x, uint32_t y, uint32_t s) {
#ifdef __CUDA_ARCH__
  return __byte_perm(x, y, s);
#else
  const uint64_t v = (uint64_t(y) << 32) | x;
  uint32_t r = 0;
  for (int n = 0; n < 4; ++n) r |= uint32_t((v >> (8 * ((s >> (4 * n)) & 7))) & 0xFF) << (8 * n);
  return r;
#endif
}

// Bit-serial code of position `i` (0..31) of a word: bit k comes from plane k.
template <int BITS>
__host__ __device__ __forceinline__ uint32_t code_at(const uint32_t (&p)[BITS], int i) {
  uint32_t c = 0;
#pragma unroll
  for (int k = 0; k < BITS; ++k) c |= ((p[k] >> i) & 1u) << k;
  return c;
}

// Four codes at once: byte j of the result = code of position 8j + m (m = 0..7), OR-ed with `init`
// (every byte of init carries the same high bits, e.g. the group's type id above the code).
template <int BITS>
__host__ __device__ __forceinline__ uint32_t gather_codes4(const uint32_t (&p)[BITS], int m, uint32_t init) {
  uint32_t r = init;
#pragma unroll
  for (int k = 0; k < BITS; ++k) r |= ((p[k] >> m) & 0x01010101u) << k;
  return r;
}

// Shared-memory slot (in floats) of the 4 activations {x[32w + 8j + m], j = 0..3} of staged word w.
// XOR-swizzled on (w >> 2) so that the 8 lanes of a quarter warp, which hold words 4l + v, read
// 8 different 16-byte bank groups with their float4 loads.
__host__ __device__ __forceinline__ int x_slot(int w, int m) { return w * 32 + ((m ^ ((w >> 2) & 7)) << 2); }

// Per-lane table (bits <= 4): entry e = (type << bits | code) of lane l lives at float e * 64 + l, so every
// lane reads its own bank (no conflicts whatever the codes). The byte offset e * 256 + 4l is one byte_perm:
// result byte 0 = lane_word byte 0 (4l), byte 1 = byte j of the gathered word (e), bytes 2, 3 = 0.
__host__ __device__ __forceinline__ uint32_t lane_table_offset(uint32_t gathered, uint32_t lane_word, int j) {
  return byte_perm(gathered, lane_word, 0x5504u | (uint32_t(j) << 4));
}

// ---------------------------------------------------------------------------------------------------------
// Element conversions.

template <typename T> struct Elem;
template <> struct Elem<__half> {
  __device__ __forceinline__ static __half from_float(float v) { return __float2half_rn(v); }
};
template <> struct Elem<__nv_bfloat16> {
  __device__ __forceinline__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};
template <> struct Elem<float> {
  __device__ __forceinline__ static float from_float(float v) { return v; }
};

// Group metadata of one (row, group): type id, scale, zero (0 when absent).
struct GroupMeta {
  uint32_t type;
  float scale, zero;
};

__device__ __forceinline__ GroupMeta load_meta(const uint8_t* __restrict__ type_ids, const __half* __restrict__ scales,
                                               const __half* __restrict__ zeros, int64_t idx) {
  GroupMeta g;
  g.type = __ldg(type_ids + idx) & (SECATEURS_MAX_TYPES - 1);  // ids >= 4 are invalid: stay inside the table
  g.scale = __half2float(__ldg(scales + idx));
  g.zero = zeros ? __half2float(__ldg(zeros + idx)) : 0.0f;
  return g;
}

// ---------------------------------------------------------------------------------------------------------
// (a) Dequantisation. One thread = 8 consecutive codes (one 16-byte store of fp16/bf16). Grid: x over the
// chunks of a row, y (grid-stride) over rows. The 4 threads of one word read the same plane words (one
// 32-byte sector per plane per warp), rebuild each code bit by bit and look it up in the shared table.

template <int BITS, typename OutT>
__global__ void __launch_bounds__(256)
    dequant_kernel(const uint32_t* __restrict__ planes, const uint8_t* __restrict__ type_ids,
                   const __half* __restrict__ scales, const __half* __restrict__ zeros,
                   const float* __restrict__ tables, int n_types, int64_t out_f, int64_t in_f, int64_t n_words,
                   int64_t n_groups, uint32_t words_per_group, bool vec_store, OutT* __restrict__ dst) {
  constexpr int NC = 1 << BITS;
  extern __shared__ float4 smem_f4[];  // DequantPlan::smem_bytes: the tables
  float* tbl = reinterpret_cast<float*>(smem_f4);
  for (int e = threadIdx.x; e < SECATEURS_MAX_TYPES * NC; e += blockDim.x)
    tbl[e] = (e / NC) < n_types ? tables[e] : 0.0f;
  __syncthreads();

  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // chunk of 8 codes in the row
  const int64_t i0 = c * 8;
  if (i0 >= in_f) return;
  const int64_t w = c >> 2;
  const int shift = int(c & 3) * 8;
  const int64_t plane_stride = out_f * n_words;
  for (int64_t o = blockIdx.y; o < out_f; o += gridDim.y) {
    uint32_t p[BITS];
#pragma unroll
    for (int k = 0; k < BITS; ++k) p[k] = __ldg(planes + k * plane_stride + o * n_words + w) >> shift;
    const GroupMeta g = load_meta(type_ids, scales, zeros, o * n_groups + uint32_t(w) / words_per_group);
    const float* t = tbl + g.type * NC;
    alignas(16) OutT v[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      // (T - z) * s as two separately rounded fp32 ops: no FMA contraction, exactly the reference.
      const float val = __fmul_rn(__fsub_rn(t[code_at<BITS>(p, j)], g.zero), g.scale);
      v[j] = Elem<OutT>::from_float(val);
    }
    OutT* d = dst + o * in_f + i0;
    if (vec_store) {  // in % 8 == 0 and dst 16-byte aligned: 1 (fp16/bf16) or 2 (fp32) 16-byte stores
#pragma unroll
      for (int q = 0; q < int(sizeof(v) / 16); ++q)
        reinterpret_cast<uint4*>(d)[q] = reinterpret_cast<const uint4*>(v)[q];
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j)
        if (i0 + j < in_f) d[j] = v[j];
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// (b) Fused dequant + GEMV, y[b, o] = sum_i x[b, i] w[o, i], batch NB <= 8 (template; rows >= nb are zero).
//
// Block = 4 warps; warp = ROWS consecutive output rows; lane l = words 4l..4l+3 of a 128-word (4096-code)
// chunk, read with one 16-byte load per plane and row (512 contiguous bytes per warp). Activations of a tile
// of `tile_words` words are staged once per block in shared memory as fp32, permuted so that the 4 codes of
// one gathered word (positions m, 8+m, 16+m, 24+m) meet their 4 activations in one float4, plus the sum of
// each word's 32 activations. Per word and row, dot = sum T[code] x is accumulated, then
// acc += s * (dot - z * sum(x)): the scale and zero are applied once per 32 codes.
// Lanes reduce with warp shuffles at the end.

// Activations as 16-bit words; `x_bf16` picks fp16 or bf16 (a run-time switch: half the instantiations).
__device__ __forceinline__ float x_to_float(uint16_t v, bool bf16) {
  return bf16 ? __bfloat162float(__ushort_as_bfloat16(v)) : __half2float(__ushort_as_half(v));
}
__device__ __forceinline__ uint16_t x_from_float(float v, bool bf16) {
  return bf16 ? __bfloat16_as_ushort(__float2bfloat16_rn(v)) : __half_as_ushort(__float2half_rn(v));
}

template <int BITS, int NB>
__global__ void __launch_bounds__(128, (GemvShape<BITS, NB>::kMinBlocks))
    gemv_kernel(const uint16_t* __restrict__ x, bool x_bf16, int nb, const uint32_t* __restrict__ planes,
                const uint8_t* __restrict__ type_ids, const __half* __restrict__ scales,
                const __half* __restrict__ zeros, const float* __restrict__ tables, int n_types, int64_t out_f,
                int64_t in_f, int64_t n_words, int64_t n_groups, uint32_t words_per_group, int tile_words,
                bool vec_load, uint16_t* __restrict__ y) {
  using S = GemvShape<BITS, NB>;
  constexpr int ROWS = S::kRows;
  extern __shared__ float4 smem_f4[];
  float* tbl = reinterpret_cast<float*>(smem_f4);
  float* xs = tbl + S::kTableFloats;                   // [NB][tile_words * 32], swizzled (x_slot)
  float* xsum = xs + size_t(NB) * tile_words * 32;     // [NB][tile_words]

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int64_t row0 = (int64_t(blockIdx.x) * S::kWarps + warp) * ROWS;
  const int64_t plane_stride = out_f * n_words;

  if (S::kLaneTable) {
    for (int e = threadIdx.x; e < (SECATEURS_MAX_TYPES << BITS) * 32; e += blockDim.x) {
      const int entry = e >> 5, l = e & 31;
      tbl[entry * kLaneTableStride + l] = (entry >> BITS) < n_types ? tables[entry] : 0.0f;
    }
  } else {
    for (int e = threadIdx.x; e < (SECATEURS_MAX_TYPES << BITS); e += blockDim.x)
      tbl[e] = (e >> BITS) < n_types ? tables[e] : 0.0f;
  }

  float acc[ROWS][NB];
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int b = 0; b < NB; ++b) acc[r][b] = 0.0f;

  const uint32_t lane_word = uint32_t(lane) * 4u;
  for (int64_t t0 = 0; t0 < n_words; t0 += tile_words) {
    const int tw = int(min(int64_t(tile_words), n_words - t0));
    __syncthreads();  // the previous tile is consumed (and, the first time, the table is written)
    // Stage: item (b, w, m) loads x[b, 32(t0+w) + 8j + m], j = 0..3; 8 consecutive lanes = one word.
    const int items = NB * tile_words * 8;  // a multiple of blockDim: no lane idles at the shuffles
    for (int it = threadIdx.x; it < items; it += blockDim.x) {
      const int m = it & 7, w = (it >> 3) % tile_words, b = (it >> 3) / tile_words;
      float4 f = make_float4(0.f, 0.f, 0.f, 0.f);
      if (b < nb && w < tw) {
        const int64_t i = (t0 + w) * 32 + m;
        const uint16_t* xr = x + b * in_f + i;
        if (i < in_f) f.x = x_to_float(xr[0], x_bf16);
        if (i + 8 < in_f) f.y = x_to_float(xr[8], x_bf16);
        if (i + 16 < in_f) f.z = x_to_float(xr[16], x_bf16);
        if (i + 24 < in_f) f.w = x_to_float(xr[24], x_bf16);
      }
      *reinterpret_cast<float4*>(xs + size_t(b) * tile_words * 32 + x_slot(w, m)) = f;
      float s = (f.x + f.y) + (f.z + f.w);
      s += __shfl_xor_sync(0xffffffffu, s, 1);
      s += __shfl_xor_sync(0xffffffffu, s, 2);
      s += __shfl_xor_sync(0xffffffffu, s, 4);
      if (m == 0) xsum[b * tile_words + w] = s;
    }
    __syncthreads();

    for (int c0 = 0; c0 < tw; c0 += S::kChunkWords) {
      const int wl = c0 + lane * 4;  // the lane's first word in the tile
      // Issue every load of this chunk before the first use: planes, then group metadata.
      uint32_t p[ROWS][4][BITS];
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const bool row_ok = row0 + r < out_f;
#pragma unroll
        for (int k = 0; k < BITS; ++k) {
          const uint32_t* src = planes + k * plane_stride + (row0 + r) * n_words + t0 + wl;
          if (row_ok && vec_load && wl < tw) {  // tw % 4 == 0 on this path
            const uint4 q = __ldcs(reinterpret_cast<const uint4*>(src));
            p[r][0][k] = q.x, p[r][1][k] = q.y, p[r][2][k] = q.z, p[r][3][k] = q.w;
          } else {
#pragma unroll
            for (int v = 0; v < 4; ++v) p[r][v][k] = (row_ok && wl + v < tw) ? __ldcs(src + v) : 0u;
          }
        }
      }
      // Group metadata, packed to keep registers for the planes: the 4 words' type ids in the 4 bytes of
      // types[r], and the fp16 scale | zero << 16 of each word.
      uint32_t types[ROWS], sz[ROWS][4];
#pragma unroll
      for (int r = 0; r < ROWS; ++r) types[r] = 0u;
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        const uint32_t g = uint32_t(t0 + wl + v) / words_per_group;
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          sz[r][v] = 0u;
          if (row0 + r < out_f && wl + v < tw) {
            const int64_t idx = (row0 + r) * n_groups + g;
            types[r] |= uint32_t(__ldg(type_ids + idx) & (SECATEURS_MAX_TYPES - 1)) << (8 * v);
            sz[r][v] = uint32_t(__half_as_ushort(__ldg(scales + idx))) |
                       (zeros ? uint32_t(__half_as_ushort(__ldg(zeros + idx))) << 16 : 0u);
          }
        }
      }

#pragma unroll
      for (int v = 0; v < 4; ++v) {
        const int w = wl + v;
        if (w >= tw) break;
        float dot[ROWS][NB];
        uint32_t init[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          // Lane table: type << BITS in every byte, above the 4 codes that gather_codes4 ORs in.
          init[r] = S::kLaneTable ? byte_perm(types[r], 0u, 0x1111u * v) << BITS : 0u;
#pragma unroll
          for (int b = 0; b < NB; ++b) dot[r][b] = 0.0f;
        }
#pragma unroll
        for (int m = 0; m < 8; ++m) {
          float4 xv[NB];
#pragma unroll
          for (int b = 0; b < NB; ++b)
            xv[b] = *reinterpret_cast<const float4*>(xs + size_t(b) * tile_words * 32 + x_slot(w, m));
#pragma unroll
          for (int r = 0; r < ROWS; ++r) {
            const uint32_t codes4 = gather_codes4<BITS>(p[r][v], m, init[r]);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              float tv;
              if (S::kLaneTable) {
                tv = *reinterpret_cast<const float*>(reinterpret_cast<const char*>(tbl) +
                                                     lane_table_offset(codes4, lane_word, j));
              } else {
                tv = tbl[(((types[r] >> (8 * v)) & 0xFFu) << BITS) + ((codes4 >> (8 * j)) & 0xFFu)];
              }
#pragma unroll
              for (int b = 0; b < NB; ++b) {
                const float xj = j == 0 ? xv[b].x : (j == 1 ? xv[b].y : (j == 2 ? xv[b].z : xv[b].w));
                dot[r][b] = fmaf(tv, xj, dot[r][b]);
              }
            }
          }
        }
#pragma unroll
        for (int b = 0; b < NB; ++b) {
          const float sx = zeros ? xsum[b * tile_words + w] : 0.0f;
#pragma unroll
          for (int r = 0; r < ROWS; ++r) {
            const float scale = __half2float(__ushort_as_half(uint16_t(sz[r][v])));
            const float zero = __half2float(__ushort_as_half(uint16_t(sz[r][v] >> 16)));
            acc[r][b] = fmaf(scale, fmaf(-zero, sx, dot[r][b]), acc[r][b]);
          }
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int b = 0; b < NB; ++b) {
      float s = acc[r][b];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
      if (lane == ((r * NB + b) & 31) && b < nb && row0 + r < out_f) y[b * out_f + row0 + r] = x_from_float(s, x_bf16);
    }
}

}  // namespace secateurs
#endif  // __CUDACC__ || SECATEURS_HOST_EMULATION
