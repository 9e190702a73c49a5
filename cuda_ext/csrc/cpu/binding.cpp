// Torch binding of the CPU bit-plane kernels: check the packed tensors, split output rows over at::parallel_for
// (OpenMP in torch's CPU builds; torch.set_num_threads applies) and pick the AVX2 or the portable kernels. The ops
// themselves are declared in Python (cuda_ext/ops.py); cuda_ext/cpu_impl.py registers these as their CPU kernels.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <optional>
#include <string>
#include <vector>

#include "bitplane_cpu.h"

namespace {

using secateurs_cpu::GemvArgs;
using secateurs_cpu::PackedView;

// Instruction-set tiers, best last. Tests lower max_isa to run every tier this CPU has.
enum Isa { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };
const char* const kIsaNames[] = {"portable", "avx2", "avx512"};
std::atomic<int> max_isa{kAvx512};

int best_isa() {
  static const int best = secateurs_cpu::avx512_supported() ? kAvx512
                          : secateurs_cpu::avx2_supported() ? kAvx2
                                                            : kPortable;
  return best;
}

void check_cpu_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

PackedView view_packed(const at::Tensor& planes, const at::Tensor& type_ids, const at::Tensor& scales,
                       const std::optional<at::Tensor>& zeros, const at::Tensor& tables, int64_t in_features,
                       int64_t group_size) {
  TORCH_CHECK(planes.scalar_type() == at::kInt && planes.dim() == 3, "planes must be int32 [bits, out, ceil(in/32)]");
  const int64_t bits = planes.size(0), out_f = planes.size(1), words = (in_features + 31) / 32;
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "bits must be 2, 3, 4 or 8, got ", bits);
  TORCH_CHECK(in_features >= 0 && planes.size(2) == words, "planes must have ceil(in/32) = ", words,
              " words per row, got ", planes.size(2));
  TORCH_CHECK(group_size > 0, "group_size must be >= 1, got ", group_size);
  const int64_t n_groups = (in_features + group_size - 1) / group_size;
  TORCH_CHECK(type_ids.scalar_type() == at::kByte && type_ids.sizes() == at::IntArrayRef({out_f, n_groups}),
              "type_ids must be uint8 [", out_f, ", ", n_groups, "]");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.sizes() == at::IntArrayRef({out_f, n_groups}),
              "scales must be float16 [", out_f, ", ", n_groups, "]");
  if (zeros) {
    TORCH_CHECK(zeros->scalar_type() == at::kHalf && zeros->sizes() == at::IntArrayRef({out_f, n_groups}),
                "zeros must be float16 [", out_f, ", ", n_groups, "] or None");
    check_cpu_contiguous(*zeros, "zeros");
  }
  TORCH_CHECK(tables.scalar_type() == at::kFloat && tables.dim() == 2 && tables.size(1) == (int64_t(1) << bits) &&
                  tables.size(0) >= 1,
              "tables must be float32 [n_types, 2**bits]");
  for (const auto& [t, name] : {std::pair{planes, "planes"}, {type_ids, "type_ids"}, {scales, "scales"},
                                {tables, "tables"}})
    check_cpu_contiguous(t, name);
  const uint8_t* ids = type_ids.data_ptr<uint8_t>();  // the kernels index tables[type_id] without bounds checks
  const uint8_t max_id = type_ids.numel() > 0 ? *std::max_element(ids, ids + type_ids.numel()) : 0;
  TORCH_CHECK(max_id < tables.size(0), "type_ids must be < n_types = ", tables.size(0));
  const auto* zero_bits = zeros ? reinterpret_cast<const uint16_t*>(zeros->data_ptr<at::Half>()) : nullptr;
  return {reinterpret_cast<const uint32_t*>(planes.data_ptr<int32_t>()), type_ids.data_ptr<uint8_t>(),
          reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()), zero_bits, tables.data_ptr<float>(),
          int(bits), out_f, in_features, words, group_size, n_groups};
}

int isa_for(const PackedView& p) {
  if (!secateurs_cpu::avx2_covers(p)) return kPortable;
  const int isa = std::min(best_isa(), max_isa.load());
  return isa == kAvx512 && !secateurs_cpu::avx512_covers(p) ? kAvx2 : isa;
}

// Codes per period of the kernels' x order (the padded row of x is a whole number of periods).
int64_t x_period(int isa, const PackedView& p) {
  return isa == kAvx512 ? secateurs_cpu::kChunkCodes : isa == kAvx2 ? secateurs_cpu::avx2_gemv_period(p) : 32;
}

// x (contiguous fp32 [batch, in]) as the kernels read it, in a per-thread buffer reused across calls (no allocation
// per call): [batch, stride = whole periods of x_period(isa, p) codes], zero past in_f (those codes multiply 0), and for
// the SIMD tiers slot k of a period holds x[period start + order(k)].
const float* gemv_input(const float* src, int64_t batch, const PackedView& p, int isa, int64_t& stride) {
  static const auto orders = [] {
    std::array<std::vector<int>, 4> o{};  // o[3]: the AVX2 GEMV's 64-code period
    for (int k = 0; k < 32; ++k) o[kPortable].push_back(k), o[kAvx2].push_back(secateurs_cpu::gemv_input_order(k, 32));
    for (int k = 0; k < 64; ++k) o[3].push_back(secateurs_cpu::gemv_input_order(k, 64));
    for (int k = 0; k < secateurs_cpu::kChunkCodes; ++k) o[kAvx512].push_back(secateurs_cpu::gemv_input_order_avx512(k));
    return o;
  }();
  thread_local std::vector<float> buffer;
  const int64_t period = x_period(isa, p);
  stride = (p.in_f + period - 1) / period * period;
  if (buffer.size() < size_t(std::max<int64_t>(batch * stride, 1))) buffer.resize(size_t(std::max<int64_t>(batch * stride, 1)));
  float* dst = buffer.data();
  const int* order = orders[isa == kAvx2 && period == 64 ? 3 : isa].data();
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t start = 0; start < stride; start += period) {
      float* d = dst + b * stride + start;
      const float* s = src + b * p.in_f + start;
      if (start + period <= p.in_f) {
        for (int64_t k = 0; k < period; ++k) d[k] = s[order[k]];
      } else {
        for (int64_t k = 0; k < period; ++k) d[k] = start + order[k] < p.in_f ? s[order[k]] : 0.0f;
      }
    }
  return dst;
}

// Rows per task: at least ~32k weights, so that small layers do not pay a thread hand-off per few rows.
int64_t row_grain(const PackedView& p) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, p.in_f)); }

// W as fp32 [out, in] into dst, rows split over threads.
void dequantize_into(const PackedView& p, float* dst) {
  const bool avx2 = isa_for(p) >= kAvx2;
  at::parallel_for(0, p.out_f, row_grain(p), [&](int64_t begin, int64_t end) {
    if (avx2)
      secateurs_cpu::dequantize_rows_f32_avx2(p, dst, begin, end);
    else
      secateurs_cpu::dequantize_rows_f32_generic(p, dst, begin, end);
  });
}

// Dense W: out_dtype [out, in], bit-exact vs cuda_ext.reference.dequantize (same fp32 arithmetic, then the same
// torch cast to out_dtype).
at::Tensor dequantize(const at::Tensor& planes, const at::Tensor& type_ids, const at::Tensor& scales,
                      const std::optional<at::Tensor>& zeros, const at::Tensor& tables, int64_t in_features,
                      int64_t group_size, at::ScalarType out_dtype) {
  const PackedView p = view_packed(planes, type_ids, scales, zeros, tables, in_features, group_size);
  at::Tensor out = at::empty({p.out_f, p.in_f}, planes.options().dtype(at::kFloat));
  float* dst = out.data_ptr<float>();
  dequantize_into(p, dst);
  return out_dtype == at::kFloat ? out : out.to(out_dtype);
}

// y = x @ W^T for fp32 x above the fused batch: W dequantised into a per-thread scratch buffer that is reused across
// calls (no fresh pages to fault in for every layer), then the very matmul of the reference: bit-exact with it. The
// buffer keeps the largest W seen (fp32) until release_scratch().
thread_local at::Tensor scratch;

at::Tensor dequant_matmul(const at::Tensor& x, const at::Tensor& planes, const at::Tensor& type_ids,
                          const at::Tensor& scales, const std::optional<at::Tensor>& zeros, const at::Tensor& tables,
                          int64_t in_features, int64_t group_size) {
  const PackedView p = view_packed(planes, type_ids, scales, zeros, tables, in_features, group_size);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() >= 1 && x.size(-1) == in_features,
              "x must be a float32 CPU tensor [..., ", in_features, "]");
  if (!scratch.defined() || scratch.numel() < p.out_f * p.in_f) scratch = at::empty({p.out_f * p.in_f}, at::kFloat);
  at::Tensor w = scratch.narrow(0, 0, p.out_f * p.in_f).view({p.out_f, p.in_f});
  float* dst = w.data_ptr<float>();
  dequantize_into(p, dst);
  return at::matmul(x, w.t());
}

// y[b, o] = sum_i x[b, i] W[o, i] for contiguous fp32 x [batch, in] into y [batch, out], output rows split over
// threads. Not bit-exact with x @ W^T (another summation order): each y[b, o] is an fp32 FMA sum of the reference's
// exact fp32 weights.
void gemv_into(const float* x, int64_t batch, const PackedView& p, float* y) {
  const int isa = isa_for(p);
  int64_t stride = 0;
  const float* padded = gemv_input(x, batch, p, isa, stride);
  const GemvArgs a{padded, stride, batch, y};
  at::parallel_for(0, p.out_f, row_grain(p), [&](int64_t begin, int64_t end) {
    if (isa == kAvx512)
      secateurs_cpu::gemv_rows_avx512(p, a, begin, end);
    else if (isa == kAvx2)
      secateurs_cpu::gemv_rows_avx2(p, a, begin, end);
    else
      secateurs_cpu::gemv_rows_generic(p, a, begin, end);
  });
}

// y = x @ W^T without materialising W: x fp32 [B, in] -> y fp32 [B, out] (gemv_into).
at::Tensor gemv(const at::Tensor& x, const at::Tensor& planes, const at::Tensor& type_ids, const at::Tensor& scales,
                const std::optional<at::Tensor>& zeros, const at::Tensor& tables, int64_t in_features,
                int64_t group_size) {
  const PackedView p = view_packed(planes, type_ids, scales, zeros, tables, in_features, group_size);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == in_features,
              "x must be a float32 CPU tensor [B, ", in_features, "]");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({x.size(0), p.out_f}, x.options());
  gemv_into(xc.data_ptr<float>(), x.size(0), p, y.data_ptr<float>());
  return y;
}

// QuantLinear.forward in one call (no Python between the checks and the kernel): y = x @ W^T (+ bias) for fp32 x
// [..., in] -> [..., out], the fused GEMV for 1..max_fused rows of x, dequantise-then-matmul above. None where the
// kernels do not take the packed tensors (the caller then runs the op, i.e. the reference).
std::optional<at::Tensor> linear(const at::Tensor& x, const at::Tensor& planes, const at::Tensor& type_ids,
                                 const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                                 const at::Tensor& tables, int64_t in_features, int64_t group_size,
                                 const std::optional<at::Tensor>& bias, int64_t max_fused) {
  const bool covered = x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() >= 1 &&
                       x.size(-1) == in_features && in_features >= 1 && planes.device().is_cpu() &&
                       planes.scalar_type() == at::kInt && planes.dim() == 3 && tables.scalar_type() == at::kFloat &&
                       group_size >= 1;
  const int64_t bits = covered ? planes.size(0) : 0;
  if (!covered || !(bits == 2 || bits == 3 || bits == 4 || bits == 8) || x.numel() == 0) return std::nullopt;
  const int64_t rows = x.numel() / in_features;
  at::Tensor y;
  if (rows <= max_fused) {
    const PackedView p = view_packed(planes, type_ids, scales, zeros, tables, in_features, group_size);
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = p.out_f;
    const at::Tensor xc = x.contiguous();
    y = at::empty(shape, x.options());
    gemv_into(xc.data_ptr<float>(), rows, p, y.data_ptr<float>());
  } else {
    y = dequant_matmul(x, planes, type_ids, scales, zeros, tables, in_features, group_size);
  }
  if (bias) y.add_(*bias);
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace pybind11::literals;
  m.doc() = "Secateurs bit-plane CPU kernels: dequantize and the fused dequant-GEMV (AVX2 + FMA, portable fallback)";
  m.def("dequantize", &dequantize, "planes"_a, "type_ids"_a, "scales"_a, "zeros"_a, "tables"_a, "in_features"_a,
        "group_size"_a, "out_dtype"_a);
  m.def("gemv", &gemv, "x"_a, "planes"_a, "type_ids"_a, "scales"_a, "zeros"_a, "tables"_a, "in_features"_a,
        "group_size"_a);
  m.def("dequant_matmul", &dequant_matmul, "x"_a, "planes"_a, "type_ids"_a, "scales"_a, "zeros"_a, "tables"_a,
        "in_features"_a, "group_size"_a);
  m.def("linear", &linear, "x"_a, "planes"_a, "type_ids"_a, "scales"_a, "zeros"_a, "tables"_a, "in_features"_a,
        "group_size"_a, "bias"_a, "max_fused"_a);
  m.def("release_scratch", [] { scratch = at::Tensor(); });
  m.def("supported_isas", [] {  // the kernel tiers this CPU runs, best last
    std::vector<std::string> names;
    for (int i = kPortable; i <= best_isa(); ++i) names.emplace_back(kIsaNames[i]);
    return names;
  });
  m.def("set_max_isa", [](const std::string& name) {  // "avx512" (default: the best), "avx2" or "portable"
    for (int i = kPortable; i <= kAvx512; ++i)
      if (name == kIsaNames[i]) return max_isa.store(i);
    TORCH_CHECK(false, "unknown instruction set ", name, " (portable, avx2 or avx512)");
  }, "name"_a);
}
