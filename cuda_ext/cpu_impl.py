"""CPU kernels for ``secateurs::dequantize`` and ``secateurs::quant_matmul`` (``cuda_ext/csrc/cpu``).

:func:`register` adds them to the ops of :mod:`cuda_ext.ops` with ``op.register_kernel("cpu")``; the torch
reference stays the ops' default implementation and the oracle of the tests. The extension is built ahead of time
by ``python -m cuda_ext.build``; without it the ops keep the reference and this is logged once.

- ``dequantize``: bit-exact with :func:`cuda_ext.reference.dequantize` (the same fp32 ``(v − z) × s``, then the
  same torch cast to ``out_dtype``).
- ``quant_matmul`` with fp32 activations and 1 ≤ rows ≤ :data:`GEMV_MAX_BATCH`: the fused dequant-GEMV, which
  never materialises Ŵ. Its weights are the reference's exact fp32 values; only the summation order differs from
  the reference's ``x @ Ŵᵀ``, so |y − y_ref| ≤ 2·n·2⁻²⁴·(|x| @ |Ŵ|ᵀ) (n = in_features, the standard bound on two
  fp32 dot products). Other inputs (more rows, fp16/bf16 activations): the C++ dequantize (fp32: into a scratch
  buffer reused across calls, ``release_scratch()`` frees it), then the reference's own ``x @ Ŵᵀ`` — bit-exact.
  Inputs the kernels do not take (unsupported widths or dtypes, other devices) go to the reference, so the
  registration never narrows what the op accepts.

Kernels: AVX-512 F/BW + GFNI (GEMV; group sizes of 128k or one group per row) and AVX2 + FMA + BMI2 chosen at run
time by the CPU's features, a portable C++ fallback for other CPUs, 8-bit codes and group sizes that split a 32-code
word; output rows split over torch's threads. :func:`direct_linear` is QuantLinear's path around the dispatcher.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from cuda_ext import reference

logger = logging.getLogger("secateurs")

CSRC = Path(__file__).resolve().parent / "csrc" / "cpu"
SOURCES = ("binding.cpp", "kernels_generic.cpp", "kernels_avx2.cpp", "kernels_avx512.cpp")
HEADERS = ("bitplane_cpu.h",)
JIT_NAME = "secateurs_cpu_ext"
# -fopenmp: at::parallel_for is a header template, so the extension itself must be built with OpenMP (as torch is).
# -ffp-contract=off: no implicit FMA, so the per-group tables round exactly like the reference.
CXX_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off"]
LD_FLAGS = ["-fopenmp"]

# Largest number of activation rows that takes the fused GEMV; above it dequantise-then-matmul, bit-exact with the
# reference. 8, as the CUDA kernels (SECATEURS_MAX_GEMV_BATCH), so that one contract holds on both devices. Measured
# with scripts/bench_cpu_kernels.py (docs/results/benchmarks.md, "CPU kernels"): the fused kernel is faster up to 8
# rows on every shape, and mostly still at 12-16 rows (not at 24 on the small shapes); a 512-token prefill must take
# the matmul.
GEMV_MAX_BATCH = 8

_state: dict[str, Any] = {"module": None, "enabled": True, "logged": False}
_loaded: dict[str, Any] = {"tried": False, "module": None, "reason": "not loaded yet"}


def cache_dir() -> Path:
    """Build folder of the CPU extension: ``$SECATEURS_CPU_EXT_CACHE``, else ``<$SECATEURS_CACHE or
    ~/.cache/secateurs>/cpu_ext/torch<version>-<hash>``; the hash covers the sources, flags and Python version, so
    edited sources never load a stale build."""
    if os.environ.get("SECATEURS_CPU_EXT_CACHE"):
        return Path(os.environ["SECATEURS_CPU_EXT_CACHE"])
    digest = hashlib.sha256(f"{CXX_FLAGS}{LD_FLAGS}{sys.version_info[:2]}".encode())
    for name in SOURCES + HEADERS:
        digest.update((CSRC / name).read_bytes())
    root = os.environ.get("SECATEURS_CACHE") or Path.home() / ".cache" / "secateurs"
    return Path(root) / "cpu_ext" / f"torch{torch.__version__}-{digest.hexdigest()[:12]}"


def load_extension() -> ModuleType | None:
    """The CPU extension built by ``python -m cuda_ext.build``, or None (:func:`unavailable_reason` says why).

    Tried once per process. It is compiled here (logged) only with ``SECATEURS_CPU_JIT=1``: a missing build must
    not stall a run for minutes, the ops keep the torch reference instead.
    """
    if not _loaded["tried"]:
        _loaded["tried"] = True
        try:
            _loaded["module"], _loaded["reason"] = _load()
        except Exception as exc:  # a broken build must leave the torch reference working
            _loaded["module"], _loaded["reason"] = None, f"{type(exc).__name__}: {exc}"
    return _loaded["module"]


def unavailable_reason() -> str:
    """Why :func:`load_extension` returned None ("" when it returned a module)."""
    return "" if _loaded["module"] is not None else str(_loaded["reason"])


def _load() -> tuple[ModuleType | None, str]:
    if JIT_NAME in sys.modules:
        return sys.modules[JIT_NAME], ""
    library = cache_dir() / f"{JIT_NAME}.so"
    if library.exists():
        spec = importlib.util.spec_from_file_location(JIT_NAME, library)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[JIT_NAME] = module
        return module, ""
    if os.environ.get("SECATEURS_CPU_JIT") != "1":
        return None, f"not built for these sources ({library} missing): run `python -m cuda_ext.build`"
    logger.info("CPU extension not built: compiling it now (SECATEURS_CPU_JIT=1)")
    from cuda_ext import build  # only here: `python -m cuda_ext.build` must not find it imported already

    return build.cpu_build(), ""


def register(dequantize_op: Any, quant_matmul_op: Any) -> bool:
    """Register the CPU kernels on both ops. False (logged once, never raised) without the extension."""
    try:
        ext = load_extension()
        if ext is None:
            _log_unavailable(unavailable_reason())
            return False
        dequantize_op.register_kernel("cpu")(_dequantize_kernel(ext))
        quant_matmul_op.register_kernel("cpu")(_quant_matmul_kernel(ext))
        _state["module"] = ext
        return True
    except Exception as exc:  # registration must never break the torch reference path
        _log_unavailable(f"{type(exc).__name__}: {exc}")
        return False


def available() -> bool:
    """True when the CPU kernels are registered (and not switched off by :func:`reference_only`)."""
    return _state["module"] is not None and bool(_state["enabled"])


def fused_max_batch() -> int:
    """Rows of activations up to which CPU ``quant_matmul`` runs the fused GEMV (0: no CPU kernels)."""
    return GEMV_MAX_BATCH if available() else 0


def direct_linear(
    x: torch.Tensor,
    planes: torch.Tensor,
    type_ids: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    tables: torch.Tensor,
    in_features: int,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor | None:
    """``quant_matmul(x, …) + bias`` by the CPU kernels in one C++ call, without the op dispatcher (~0.1 ms a call
    on a 2-core CPU, as long as a small layer's GEMV) or per-call Python checks: y [..., out] for fp32 CPU x
    [..., in] — the fused GEMV for 1..GEMV_MAX_BATCH rows, dequantise-then-matmul above — or None where the kernels
    do not take the input (the caller runs the op). Same kernels and results as the op; no autograd, no
    torch.compile tracing (callers check both)."""
    ext = _state["module"]
    if ext is None or not _state["enabled"]:
        return None
    return ext.linear(x, planes, type_ids, scales, zeros, tables, in_features, group_size, bias, GEMV_MAX_BATCH)


def extension() -> ModuleType | None:
    """The loaded extension module (``supported_isas()``, ``set_max_isa(name)``), or None."""
    return _state["module"]


@contextmanager
def reference_only() -> Iterator[None]:
    """Inside the block the CPU ops run the torch reference (benchmarks compare both in one process)."""
    previous = _state["enabled"]
    _state["enabled"] = False
    try:
        yield
    finally:
        _state["enabled"] = previous


def _log_unavailable(reason: str) -> None:
    if not _state["logged"]:
        _state["logged"] = True
        logger.info("CPU kernels unavailable → torch reference (%s)", reason)


def _kernel_covers(planes: torch.Tensor, tables: torch.Tensor, group_size: int) -> bool:
    """True when the packed weight is in the form the C++ kernels take (else: the torch reference)."""
    return (
        bool(_state["enabled"])
        and planes.device.type == "cpu"
        and planes.dim() == 3
        and planes.dtype == torch.int32
        and planes.shape[0] in reference.SUPPORTED_BITS
        and tables.dtype == torch.float32
        and group_size >= 1
    )


def _dequantize_kernel(ext: ModuleType):
    def dequantize_cpu(
        planes: torch.Tensor,
        type_ids: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        tables: torch.Tensor,
        in_features: int,
        group_size: int,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        args = (planes, type_ids, scales, zeros, tables, in_features, group_size)
        if _kernel_covers(planes, tables, group_size) and out_dtype in reference.OUT_DTYPES:
            return ext.dequantize(*_contiguous(args), out_dtype)
        return reference.dequantize(*args, out_dtype)

    return dequantize_cpu


def _quant_matmul_kernel(ext: ModuleType):
    def quant_matmul_cpu(
        x: torch.Tensor,
        planes: torch.Tensor,
        type_ids: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        tables: torch.Tensor,
        in_features: int,
        group_size: int,
    ) -> torch.Tensor:
        packed = (planes, type_ids, scales, zeros, tables, in_features, group_size)
        covered = x.dim() >= 1 and x.shape[-1] == in_features and x.dtype in reference.OUT_DTYPES
        if not (covered and _kernel_covers(planes, tables, group_size)):
            return reference.quant_matmul(x, *packed)
        packed = _contiguous(packed)
        rows = x.numel() // max(in_features, 1)
        if x.dtype == torch.float32 and 1 <= rows <= GEMV_MAX_BATCH and in_features > 0:
            y = ext.gemv(x.reshape(rows, in_features), *packed)
            return y.reshape(*x.shape[:-1], y.shape[-1])
        if x.dtype == torch.float32:  # Ŵ into a reused scratch buffer, then the reference's matmul
            return ext.dequant_matmul(x, *packed)
        return x @ ext.dequantize(*packed, x.dtype).T  # exactly the reference's computation

    return quant_matmul_cpu


def _contiguous(packed: tuple) -> tuple:
    return tuple(t.contiguous() if isinstance(t, torch.Tensor) else t for t in packed)
