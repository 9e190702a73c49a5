// Host launchers of the bit-plane kernels (bitplane.cuh): template dispatch and launch geometry.
// CUDA runtime only; the torch binding (binding.cpp) calls these through their extern "C" names.
#include <stdint.h>

#include <atomic>

#include "bitplane.cuh"

namespace secateurs {
namespace {

// One packed weight, as the launchers pass it around.
struct Packed {
  const uint32_t* planes;
  const uint8_t* type_ids;
  const __half* scales;
  const __half* zeros;  // nullptr: no zero points
  const float* tables;
  int n_types, bits;
  int64_t out_f, in_f, group_size;

  int64_t n_words() const { return (in_f + 31) / 32; }
  int64_t n_groups() const { return (in_f + group_size - 1) / group_size; }
  bool valid() const {
    const bool bits_ok = bits == 2 || bits == 3 || bits == 4 || bits == 8;
    return bits_ok && n_types >= 1 && n_types <= SECATEURS_MAX_TYPES && out_f >= 0 && in_f >= 0 && group_size > 0 &&
           (group_size % 32 == 0 || group_size >= in_f);
  }
};

template <int BITS, typename OutT>
cudaError_t launch_dequant(const Packed& w, void* dst, cudaStream_t stream) {
  const DequantPlan plan = plan_dequant(BITS, w.out_f, w.in_f, dst);
  dequant_kernel<BITS, OutT><<<dim3(plan.grid_x, plan.grid_y), 256, plan.smem_bytes, stream>>>(
      w.planes, w.type_ids, w.scales, w.zeros, w.tables, w.n_types, w.out_f, w.in_f, w.n_words(), w.n_groups(),
      words_per_group(w.in_f, w.group_size), plan.vec_store, static_cast<OutT*>(dst));
  return cudaGetLastError();
}

template <typename OutT>
cudaError_t dispatch_dequant(const Packed& w, void* dst, cudaStream_t stream) {
  switch (w.bits) {
    case 2: return launch_dequant<2, OutT>(w, dst, stream);
    case 3: return launch_dequant<3, OutT>(w, dst, stream);
    case 4: return launch_dequant<4, OutT>(w, dst, stream);
    case 8: return launch_dequant<8, OutT>(w, dst, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <int BITS, int NB>
cudaError_t launch_gemv(const Packed& w, const void* x, bool x_bf16, int nb, void* y, cudaStream_t stream) {
  int dev = 0, max_smem = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;
  const GemvPlan plan = plan_gemv<BITS, NB>(w.out_f, w.in_f, w.planes, size_t(max_smem));
  if (plan.tile_words == 0) return cudaErrorInvalidConfiguration;  // the binding falls back to dequant + matmul
  auto kernel = gemv_kernel<BITS, NB>;
  // Above 48 KB a kernel needs its dynamic shared-memory limit raised: once per device, to the maximum, so
  // that later calls (also those captured in a CUDA graph) make no attribute call.
  static std::atomic<uint64_t> raised{0};
  const uint64_t bit = uint64_t(1) << (dev & 63);
  if (plan.smem_bytes > 48 * 1024 && !(raised.load() & bit)) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem);
    if (err != cudaSuccess) return err;
    raised.fetch_or(bit);
  }
  kernel<<<plan.blocks, GemvShape<BITS, NB>::kWarps * 32, plan.smem_bytes, stream>>>(
      static_cast<const uint16_t*>(x), x_bf16, nb, w.planes, w.type_ids, w.scales, w.zeros, w.tables, w.n_types,
      w.out_f, w.in_f, w.n_words(), w.n_groups(), words_per_group(w.in_f, w.group_size), int(plan.tile_words),
      plan.vec_load, static_cast<uint16_t*>(y));
  return cudaGetLastError();
}

// Batch rounded up to a power of two (4 instantiations instead of 8); the padded rows stage zeros.
template <int BITS>
cudaError_t dispatch_gemv_batch(const Packed& w, const void* x, bool x_bf16, int nb, void* y, cudaStream_t stream) {
  if (nb <= 1) return launch_gemv<BITS, 1>(w, x, x_bf16, nb, y, stream);
  if (nb <= 2) return launch_gemv<BITS, 2>(w, x, x_bf16, nb, y, stream);
  if (nb <= 4) return launch_gemv<BITS, 4>(w, x, x_bf16, nb, y, stream);
  return launch_gemv<BITS, 8>(w, x, x_bf16, nb, y, stream);
}

cudaError_t dispatch_gemv(const Packed& w, const void* x, bool x_bf16, int nb, void* y, cudaStream_t stream) {
  switch (w.bits) {
    case 2: return dispatch_gemv_batch<2>(w, x, x_bf16, nb, y, stream);
    case 3: return dispatch_gemv_batch<3>(w, x, x_bf16, nb, y, stream);
    case 4: return dispatch_gemv_batch<4>(w, x, x_bf16, nb, y, stream);
    case 8: return dispatch_gemv_batch<8>(w, x, x_bf16, nb, y, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace
}  // namespace secateurs

extern "C" cudaError_t secateurs_dequantize(const int32_t* planes, const uint8_t* type_ids, const void* scales,
                                            const void* zeros, const float* tables, int n_types, int bits,
                                            int64_t out_features, int64_t in_features, int64_t group_size,
                                            int out_dtype, void* dst, cudaStream_t stream) {
  using namespace secateurs;
  const Packed w{reinterpret_cast<const uint32_t*>(planes), type_ids, static_cast<const __half*>(scales),
                 static_cast<const __half*>(zeros), tables, n_types, bits, out_features, in_features, group_size};
  if (!w.valid()) return cudaErrorInvalidValue;
  if (out_features == 0 || in_features == 0) return cudaSuccess;
  switch (out_dtype) {
    case SECATEURS_F16: return dispatch_dequant<__half>(w, dst, stream);
    case SECATEURS_BF16: return dispatch_dequant<__nv_bfloat16>(w, dst, stream);
    case SECATEURS_F32: return dispatch_dequant<float>(w, dst, stream);
    default: return cudaErrorInvalidValue;
  }
}

extern "C" cudaError_t secateurs_quant_gemv(const void* x, int64_t batch, const int32_t* planes,
                                            const uint8_t* type_ids, const void* scales, const void* zeros,
                                            const float* tables, int n_types, int bits, int64_t out_features,
                                            int64_t in_features, int64_t group_size, int x_dtype, void* y,
                                            cudaStream_t stream) {
  using namespace secateurs;
  const Packed w{reinterpret_cast<const uint32_t*>(planes), type_ids, static_cast<const __half*>(scales),
                 static_cast<const __half*>(zeros), tables, n_types, bits, out_features, in_features, group_size};
  if (!w.valid() || batch < 0 || batch > SECATEURS_MAX_GEMV_BATCH) return cudaErrorInvalidValue;
  if (x_dtype != SECATEURS_F16 && x_dtype != SECATEURS_BF16) return cudaErrorInvalidValue;
  if (batch == 0 || out_features == 0) return cudaSuccess;
  return dispatch_gemv(w, x, x_dtype == SECATEURS_BF16, int(batch), y, stream);
}
