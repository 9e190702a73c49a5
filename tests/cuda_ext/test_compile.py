"""cuda_ext/csrc without a GPU: nvcc compiles every .cu, the kernels run in a CPU emulation against
cuda_ext.reference, and the CPU-only fallbacks (registration, build, benchmark) behave.

The emulation compiles the kernel code of ``bitplane.cuh`` with the host compiler
(``SECATEURS_HOST_EMULATION``) and runs each block with one std::thread per CUDA thread, a barrier for
``__syncthreads`` and the warp shuffles, and the launch geometry of the real launchers (``plan_dequant``,
``plan_gemv``). It checks indexing, tiling, ragged shapes, the bit tricks and the dequantisation rounding;
not timing, races or device-only intrinsics.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cuda_ext import build, cuda_impl, reference

REPO = Path(__file__).resolve().parents[2]
CSRC = REPO / "cuda_ext" / "csrc"
NVCC = shutil.which("nvcc")
CXX = shutil.which("g++")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: CUDA compile check skipped")


@needs_nvcc
@pytest.mark.parametrize("source", sorted(p.name for p in CSRC.glob("*.cu")))
def test_nvcc_compiles(source: str, tmp_path: Path) -> None:
    # sm_90 (H100/H200) and sm_80 (A100) in one call; ptxas runs the two in parallel (--threads 2).
    cmd = [
        str(NVCC),
        "-c",
        "-std=c++17",
        "-O3",
        "-gencode",
        "arch=compute_90,code=sm_90",
        "-gencode",
        "arch=compute_80,code=sm_80",
        "--threads",
        "2",
        "-o",
        str(tmp_path / "tmp.o"),
        str(CSRC / source),
    ]
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr}"
    print(f"{source}: nvcc sm_90 + sm_80 in {time.perf_counter() - start:.1f} s")


# ----------------------------------------------------------------------------------------------------------
# CPU emulation of the kernels

EMULATOR = r"""
#include <algorithm>
#include <barrier>
#include <cstdio>
#include <cstring>
#include <functional>
#include <math.h>
#include <stdexcept>
#include <thread>
#include <vector>

#include <cuda_runtime_api.h>
#include <vector_functions.h>
using std::min;
#define __launch_bounds__(...)

thread_local uint3 threadIdx, blockIdx;
thread_local dim3 blockDim, gridDim;
static std::barrier<>* g_barrier;
static std::vector<float> g_shfl;
namespace secateurs { alignas(16) float4 smem_f4[64 * 1024]; }  // the kernels' extern __shared__

inline void __syncthreads() { g_barrier->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int off) {
  g_shfl[threadIdx.x] = v;
  __syncthreads();
  const float r = g_shfl[(threadIdx.x & ~31u) | ((threadIdx.x & 31u) ^ unsigned(off))];
  __syncthreads();
  return r;
}
template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcs(const T* p) { return *p; }
inline float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }

#define SECATEURS_HOST_EMULATION
#include "bitplane.cuh"
using namespace secateurs;

// Every block of the grid, one std::thread per thread of a block.
static void launch(dim3 grid, dim3 block, const std::function<void()>& kernel) {
  std::barrier<> bar(block.x);
  g_barrier = &bar;
  g_shfl.assign(block.x, 0.f);
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < block.x; ++t)
    pool.emplace_back([&, t] {
      threadIdx = {t, 0, 0}, blockDim = block, gridDim = grid;
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          blockIdx = {bx, by, 0};
          kernel();
          bar.arrive_and_wait();  // the block is done before the next one reuses shared memory
        }
    });
  for (auto& th : pool) th.join();
}

struct Case {
  int64_t bits, out_f, in_f, group_size, n_types, nb, has_zeros, x_bf16, out_dtype, max_smem, grid_y_cap;
  std::vector<int32_t> planes;
  std::vector<uint8_t> type_ids;
  std::vector<__half> scales, zeros;
  std::vector<float> tables;
  std::vector<uint16_t> x;
  int64_t n_words() const { return (in_f + 31) / 32; }
  int64_t n_groups() const { return (in_f + group_size - 1) / group_size; }
  const uint32_t* p() const { return reinterpret_cast<const uint32_t*>(planes.data()); }
  const __half* z() const { return has_zeros ? zeros.data() : nullptr; }
};

template <int BITS, typename OutT> static void run_dequant(const Case& c, void* dst) {
  DequantPlan plan = plan_dequant(BITS, c.out_f, c.in_f, dst);
  plan.grid_y = std::min<unsigned>(plan.grid_y, unsigned(c.grid_y_cap));  // exercise the row grid-stride
  launch(dim3(plan.grid_x, plan.grid_y), dim3(256), [&] {
    dequant_kernel<BITS, OutT>(c.p(), c.type_ids.data(), c.scales.data(), c.z(), c.tables.data(),
                               int(c.n_types), c.out_f, c.in_f, c.n_words(), c.n_groups(),
                               words_per_group(c.in_f, c.group_size), plan.vec_store,
                               static_cast<OutT*>(dst));
  });
}

template <int BITS, int NB> static void run_gemv(const Case& c, uint16_t* y) {
  const GemvPlan plan = plan_gemv<BITS, NB>(c.out_f, c.in_f, c.p(), size_t(c.max_smem));
  if (plan.tile_words == 0 || plan.smem_bytes > sizeof(smem_f4)) throw std::runtime_error("no GEMV plan");
  printf("tile_words=%lld vec_load=%d\n", (long long)plan.tile_words, int(plan.vec_load));
  launch(dim3(plan.blocks), dim3(GemvShape<BITS, NB>::kWarps * 32), [&] {
    gemv_kernel<BITS, NB>(c.x.data(), c.x_bf16 != 0, int(c.nb), c.p(), c.type_ids.data(), c.scales.data(),
                          c.z(), c.tables.data(), int(c.n_types), c.out_f, c.in_f, c.n_words(), c.n_groups(),
                          words_per_group(c.in_f, c.group_size), int(plan.tile_words), plan.vec_load, y);
  });
}

template <int BITS> static void run_all(const Case& c, void* w, uint16_t* y) {
  if (c.out_dtype == SECATEURS_F16) run_dequant<BITS, __half>(c, w);
  if (c.out_dtype == SECATEURS_BF16) run_dequant<BITS, __nv_bfloat16>(c, w);
  if (c.out_dtype == SECATEURS_F32) run_dequant<BITS, float>(c, w);
  if (c.nb <= 1) run_gemv<BITS, 1>(c, y);
  else if (c.nb <= 2) run_gemv<BITS, 2>(c, y);
  else if (c.nb <= 4) run_gemv<BITS, 4>(c, y);
  else run_gemv<BITS, 8>(c, y);
}

template <typename T> static void read_vec(FILE* f, std::vector<T>& v, int64_t n) {
  v.resize(size_t(n));
  if (n && fread(v.data(), sizeof(T), size_t(n), f) != size_t(n)) throw std::runtime_error("short read");
}

int main(int argc, char** argv) {  // emulate IN W_OUT Y_OUT
  if (argc != 4) return 2;
  FILE* f = fopen(argv[1], "rb");
  Case c;
  if (fread(&c, sizeof(int64_t), 11, f) != 11) return 3;
  read_vec(f, c.planes, c.bits * c.out_f * c.n_words());
  read_vec(f, c.type_ids, c.out_f * c.n_groups());
  read_vec(f, c.scales, c.out_f * c.n_groups());
  read_vec(f, c.zeros, c.has_zeros ? c.out_f * c.n_groups() : 0);
  read_vec(f, c.tables, c.n_types << c.bits);
  read_vec(f, c.x, c.nb * c.in_f);
  fclose(f);
  const size_t w_bytes = size_t(c.out_f * c.in_f) * (c.out_dtype == SECATEURS_F32 ? 4 : 2);
  std::vector<float4> w(w_bytes / 16 + 1);                     // 16-byte aligned, like a torch allocation
  memset(w.data(), 0x7f, w.size() * 16);                       // poison: every element must be written
  std::vector<uint16_t> y(size_t(c.nb * c.out_f), 0x7fff);
  switch (c.bits) {
    case 2: run_all<2>(c, w.data(), y.data()); break;
    case 3: run_all<3>(c, w.data(), y.data()); break;
    case 4: run_all<4>(c, w.data(), y.data()); break;
    case 8: run_all<8>(c, w.data(), y.data()); break;
    default: return 4;
  }
  FILE* o = fopen(argv[2], "wb");
  fwrite(w.data(), 1, w_bytes, o);
  fclose(o);
  o = fopen(argv[3], "wb");
  fwrite(y.data(), 2, y.size(), o);
  fclose(o);
  return 0;
}
"""


def _cuda_include_dir() -> Path | None:
    """The CUDA toolkit's include directory (the one holding cuda_runtime_api.h), from nvcc's dry run."""
    if NVCC is None:
        return None
    dry = subprocess.run([NVCC, "--dryrun", "-E", "-x", "cu", "/dev/null"], capture_output=True, text=True)
    top = re.search(r"TOP=(\S+)", dry.stdout + dry.stderr)
    roots = [Path(top.group(1))] if top else []
    roots.append(Path(NVCC).resolve().parent.parent)
    for root in roots:
        for include in [root / "include", *sorted(root.glob("targets/*/include"))]:
            if (include / "cuda_runtime_api.h").exists():
                return include
    return None


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Path:
    include = _cuda_include_dir()
    if CXX is None or include is None:
        pytest.skip("the kernel emulation needs g++ and the CUDA headers (nvcc)")
    work = tmp_path_factory.mktemp("emulator")
    (work / "emulate.cpp").write_text(EMULATOR)
    cmd = [
        CXX,
        "-std=c++20",
        "-O1",
        "-ffp-contract=off",
        "-pthread",
        f"-I{include}",
        f"-I{CSRC}",
        str(work / "emulate.cpp"),
        "-o",
        str(work / "emulate"),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return work / "emulate"


OUT_DTYPES = {0: torch.float16, 1: torch.bfloat16, 2: torch.float32}


def _random_packed(bits: int, out_f: int, in_f: int, group_size: int, n_types: int, zeros: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=g).to(torch.uint8)
    n_groups = -(-in_f // group_size)
    type_ids = torch.randint(0, n_types, (out_f, n_groups), generator=g).to(torch.uint8)
    scales = (torch.rand(out_f, n_groups, generator=g) * 0.1 + 1e-3).half()
    zero_points = (torch.randn(out_f, n_groups, generator=g) * 4).half() if zeros else None
    tables = torch.randn(n_types, 2**bits, generator=g) * 3
    return reference.pack_bitplanes(codes, bits), type_ids, scales, zero_points, tables


# bits, out, in, group, n_types, batch, zeros, x bf16, dense dtype (0 fp16, 1 bf16, 2 fp32),
# shared-memory limit, cap on grid.y of the dequantisation
EMULATED = [
    (2, 7, 100, 32, 4, 3, True, False, 0, 232448, 65535),
    (3, 129, 4097, 128, 3, 1, False, True, 1, 232448, 65535),  # ragged word and group, unaligned plane rows
    (4, 33, 256, 64, 2, 8, True, True, 2, 232448, 65535),
    (8, 7, 100, 32, 4, 5, True, False, 1, 232448, 65535),
    (4, 1, 1, 32, 1, 1, True, False, 0, 232448, 65535),
    (4, 7, 31, 32, 4, 2, False, False, 1, 232448, 65535),
    (3, 5, 33, 64, 4, 4, True, True, 0, 232448, 65535),
    (2, 9, 1000, 1000, 4, 2, True, False, 1, 232448, 65535),  # per channel: group >= in, not a multiple of 32
    (
        4,
        20,
        16384,
        128,
        4,
        1,
        True,
        False,
        0,
        232448,
        5,
    ),  # 2 activation tiles, 16-byte loads; row grid-stride
    (3, 9, 9000, 32, 4, 7, True, True, 0, 232448, 3),  # 3 tiles of 128 words, batch padded 7 -> 8
    (8, 3, 4096, 128, 2, 6, False, False, 2, 232448, 65535),
    (4, 5, 8192, 128, 4, 1, False, False, 0, 40960, 65535),  # small shared memory: 2 tiles of 128 words
]


@pytest.mark.parametrize("case", EMULATED, ids=lambda c: "b{}-o{}-i{}-g{}-nb{}".format(*c[:4], c[5]))
def test_emulated_kernels_match_reference(emulator: Path, case: tuple, tmp_path: Path) -> None:
    bits, out_f, in_f, group, n_types, nb, zeros, x_bf16, out_code, max_smem, grid_y_cap = case
    planes, type_ids, scales, zero_points, tables = _random_packed(
        bits, out_f, in_f, group, n_types, zeros, seed=1
    )
    x_dtype = torch.bfloat16 if x_bf16 else torch.float16
    x = torch.randn(nb, in_f, generator=torch.Generator().manual_seed(2)).to(x_dtype)
    header = np.array(case[:6] + (int(zeros), int(x_bf16), out_code, max_smem, grid_y_cap), dtype=np.int64)
    parts = [header, planes, type_ids, scales.view(torch.int16), tables, x.view(torch.int16)]
    if zero_points is not None:
        parts.insert(4, zero_points.view(torch.int16))
    (tmp_path / "in").write_bytes(b"".join(np.asarray(p).tobytes() for p in parts))
    result = subprocess.run(
        [str(emulator), *(str(tmp_path / n) for n in ("in", "w", "y"))], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr

    out_dtype = OUT_DTYPES[out_code]
    raw = torch.int32 if out_dtype == torch.float32 else torch.int16
    dense = torch.from_numpy(np.fromfile(tmp_path / "w", dtype=np.int32 if out_code == 2 else np.int16))
    want = reference.dequantize(planes, type_ids, scales, zero_points, tables, in_f, group, out_dtype)
    assert torch.equal(dense.reshape(out_f, in_f), want.view(raw)), "dequantize is not bit-exact"

    y = (
        torch.from_numpy(np.fromfile(tmp_path / "y", dtype=np.int16))
        .view(x_dtype)
        .reshape(nb, out_f)
        .double()
    )
    w = reference.dequantize(
        planes, type_ids, scales, zero_points, tables, in_f, group, torch.float32
    ).double()
    exact = x.double() @ w.T
    # fp32 accumulation over `in` terms (+ the per-word scale/zero fold), then one rounding to x's dtype.
    bound = (x.double().abs() @ w.abs().T) * (in_f + 64) * 2.0**-24 + exact.abs() * torch.finfo(
        x_dtype
    ).eps / 2
    assert torch.isfinite(y).all() and ((y - exact).abs() <= bound).all(), (
        "fused GEMV outside its error bound"
    )


# ----------------------------------------------------------------------------------------------------------
# CPU-only behaviour of the Python side


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback")
def test_register_without_cuda_logs_once_and_returns_false(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cuda_impl, "_logged", False)

    @torch.library.custom_op("secateurs_test::identity", mutates_args=())
    def identity(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    with caplog.at_level(logging.INFO, logger="secateurs"):
        assert cuda_impl.register(identity, identity) is False
        assert cuda_impl.register(identity, identity) is False
    messages = [r.getMessage() for r in caplog.records if "CUDA extension unavailable" in r.getMessage()]
    assert len(messages) == 1, messages
    assert build.load_extension() is None and build.unavailable_reason()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback")
def test_benchmark_exits_cleanly_without_cuda(tmp_path: Path) -> None:
    script = REPO / "scripts" / "bench_dequant.py"
    result = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path)], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    assert "no CUDA device: nothing to benchmark" in result.stdout
