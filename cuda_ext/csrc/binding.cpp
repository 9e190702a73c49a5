// Thin torch binding of the bit-plane launchers (bitplane_dequant.cu). The torch ops themselves are declared in
// Python (cuda_ext/ops.py, torch.library.custom_op); cuda_ext/cuda_impl.py registers these functions as their
// CUDA kernels. Here: check shapes, dtypes, devices and contiguity, then launch on the current stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <optional>

#include "bitplane.cuh"

namespace {

struct PackedArgs {
  int bits, n_types;
  int64_t out_f, in_f, group_size;
};

void check_cuda_contiguous(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.device() == device, name, " must be on ", device, ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

PackedArgs check_packed(const at::Tensor& planes, const at::Tensor& type_ids, const at::Tensor& scales,
                        const std::optional<at::Tensor>& zeros, const at::Tensor& tables, int64_t in_features,
                        int64_t group_size) {
  TORCH_CHECK(planes.is_cuda(), "planes must be a CUDA tensor");
  const at::Device device = planes.device();
  TORCH_CHECK(planes.scalar_type() == at::kInt && planes.dim() == 3, "planes must be int32 [bits, out, ceil(in/32)]");
  const int64_t bits = planes.size(0), out_f = planes.size(1);
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "bits must be 2, 3, 4 or 8, got ", bits);
  TORCH_CHECK(in_features >= 0 && planes.size(2) == (in_features + 31) / 32, "planes must have ceil(in/32) = ",
              (in_features + 31) / 32, " words per row, got ", planes.size(2));
  TORCH_CHECK(group_size > 0 && (group_size % 32 == 0 || group_size >= in_features),
              "group_size must be a multiple of 32 or >= in_features, got ", group_size);
  const int64_t n_groups = (in_features + group_size - 1) / group_size;
  TORCH_CHECK(type_ids.scalar_type() == at::kByte && type_ids.sizes() == at::IntArrayRef({out_f, n_groups}),
              "type_ids must be uint8 [", out_f, ", ", n_groups, "]");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.sizes() == at::IntArrayRef({out_f, n_groups}),
              "scales must be float16 [", out_f, ", ", n_groups, "]");
  if (zeros) {
    TORCH_CHECK(zeros->scalar_type() == at::kHalf && zeros->sizes() == at::IntArrayRef({out_f, n_groups}),
                "zeros must be float16 [", out_f, ", ", n_groups, "] or None");
    check_cuda_contiguous(*zeros, "zeros", device);
  }
  TORCH_CHECK(tables.scalar_type() == at::kFloat && tables.dim() == 2 && tables.size(1) == (int64_t(1) << bits) &&
                  tables.size(0) >= 1 && tables.size(0) <= SECATEURS_MAX_TYPES,
              "tables must be float32 [1..4, 2**bits]");
  check_cuda_contiguous(planes, "planes", device);
  check_cuda_contiguous(type_ids, "type_ids", device);
  check_cuda_contiguous(scales, "scales", device);
  check_cuda_contiguous(tables, "tables", device);
  return {int(bits), int(tables.size(0)), out_f, in_features, group_size};
}

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return SECATEURS_F16;
    case at::kBFloat16: return SECATEURS_BF16;
    case at::kFloat: return SECATEURS_F32;
    default: TORCH_CHECK(false, "unsupported dtype ", t, " (float16, bfloat16 or float32)");
  }
  return -1;
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

void launch_dequantize(const at::Tensor& planes, const at::Tensor& type_ids, const at::Tensor& scales,
                       const std::optional<at::Tensor>& zeros, const at::Tensor& tables, const PackedArgs& a,
                       at::Tensor& out) {
  check_launch(secateurs_dequantize(planes.data_ptr<int32_t>(), type_ids.data_ptr<uint8_t>(), scales.data_ptr(),
                                    zeros ? zeros->data_ptr() : nullptr, tables.data_ptr<float>(), a.n_types, a.bits,
                                    a.out_f, a.in_f, a.group_size, dtype_code(out.scalar_type()), out.data_ptr(),
                                    c10::cuda::getCurrentCUDAStream().stream()),
               "secateurs_dequantize");
}

// Dense W: out_dtype [out, in], bit-exact vs cuda_ext.reference.dequantize.
at::Tensor dequantize(const at::Tensor& planes, const at::Tensor& type_ids, const at::Tensor& scales,
                      const std::optional<at::Tensor>& zeros, const at::Tensor& tables, int64_t in_features,
                      int64_t group_size, at::ScalarType out_dtype) {
  const PackedArgs a = check_packed(planes, type_ids, scales, zeros, tables, in_features, group_size);
  dtype_code(out_dtype);
  const c10::cuda::CUDAGuard guard(planes.device());
  at::Tensor out = at::empty({a.out_f, a.in_f}, planes.options().dtype(out_dtype));
  launch_dequantize(planes, type_ids, scales, zeros, tables, a, out);
  return out;
}

// y = x @ W^T: x fp16/bf16 [B, in] -> [B, out]. B <= 8: fused GEMV; else (or when the GEMV's shared memory
// does not fit the device) dequantise to x.dtype and cuBLAS.
at::Tensor quant_matmul(const at::Tensor& x_in, const at::Tensor& planes, const at::Tensor& type_ids,
                        const at::Tensor& scales, const std::optional<at::Tensor>& zeros, const at::Tensor& tables,
                        int64_t in_features, int64_t group_size) {
  const PackedArgs a = check_packed(planes, type_ids, scales, zeros, tables, in_features, group_size);
  TORCH_CHECK(x_in.device() == planes.device(), "x must be on ", planes.device(), ", got ", x_in.device());
  TORCH_CHECK(x_in.scalar_type() == at::kHalf || x_in.scalar_type() == at::kBFloat16,
              "x must be float16 or bfloat16, got ", x_in.scalar_type());
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == in_features, "x must be [B, ", in_features, "]");
  const c10::cuda::CUDAGuard guard(planes.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t batch = x.size(0);
  if (batch <= SECATEURS_MAX_GEMV_BATCH) {
    at::Tensor y = at::empty({batch, a.out_f}, x.options());
    const cudaError_t err = secateurs_quant_gemv(
        x.data_ptr(), batch, planes.data_ptr<int32_t>(), type_ids.data_ptr<uint8_t>(), scales.data_ptr(),
        zeros ? zeros->data_ptr() : nullptr, tables.data_ptr<float>(), a.n_types, a.bits, a.out_f, a.in_f,
        a.group_size, dtype_code(x.scalar_type()), y.data_ptr(), c10::cuda::getCurrentCUDAStream().stream());
    if (err != cudaErrorInvalidConfiguration) {
      check_launch(err, "secateurs_quant_gemv");
      return y;
    }
  }
  at::Tensor w = at::empty({a.out_f, a.in_f}, planes.options().dtype(x.scalar_type()));
  launch_dequantize(planes, type_ids, scales, zeros, tables, a, w);
  return at::matmul(x, w.t());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace pybind11::literals;
  m.doc() = "Secateurs bit-plane kernels: dequantize and quant_matmul (fused GEMV for batch <= 8)";
  m.def("dequantize", &dequantize, "planes"_a, "type_ids"_a, "scales"_a, "zeros"_a, "tables"_a, "in_features"_a,
        "group_size"_a, "out_dtype"_a);
  m.def("quant_matmul", &quant_matmul, "x"_a, "planes"_a, "type_ids"_a, "scales"_a, "zeros"_a, "tables"_a,
        "in_features"_a, "group_size"_a);
  m.attr("MAX_GEMV_BATCH") = SECATEURS_MAX_GEMV_BATCH;
}
