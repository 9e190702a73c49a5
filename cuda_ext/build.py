"""Build the optional CUDA extension (``cuda_ext/csrc``): ahead of time (opt-in) or just in time (logged).

- :func:`aot_extension` gives a ``CUDAExtension`` named ``cuda_ext._C`` for a ``setup.py`` (the project ships
  none: ``pyproject.toml`` stays pure Python). It is opt-in: ``SECATEURS_BUILD_CUDA=1``, a CUDA build of
  torch and ``nvcc``; otherwise it returns None, so a CPU-only install never fails.
- ``python -m cuda_ext.build`` compiles the extension in place with ``torch.utils.cpp_extension.load`` into a
  cache directory (``$SECATEURS_CUDA_CACHE``, default ``~/.cache/secateurs/cuda_ext/<torch>-<cuda>``) and logs
  each step; later processes reuse the build.
- :func:`load_extension` returns the prebuilt ``cuda_ext._C`` if importable, else that JIT build (first use
  compiles, with a logged message), else None; :func:`unavailable_reason` then says why.

The CPU extension (``cuda_ext/csrc/cpu``: AVX2/AVX-512 kernels chosen at run time, a portable fallback; any CPU
with a C++17 compiler) is built by the same command (:func:`cpu_build`), ahead of time, into the folder of
:func:`cuda_ext.cpu_impl.cache_dir`, where ``cuda_ext.cpu_impl`` loads it from.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger("secateurs")

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("binding.cpp", "bitplane_dequant.cu")
JIT_NAME = "secateurs_cuda_ext"
# No --use_fast_math: dequantisation must round exactly like the reference (no flush-to-zero).
NVCC_FLAGS = ["-O3", "-std=c++17", "-lineinfo"]
CXX_FLAGS = ["-O3", "-std=c++17"]

_state: dict[str, object] = {"tried": False, "module": None, "reason": "not loaded yet"}


def _nvcc() -> str | None:
    """Path of nvcc: $CUDA_HOME/bin/nvcc as torch sees it, else the one on PATH."""
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    candidate = Path(home) / "bin" / "nvcc" if home else None
    if candidate is not None and candidate.exists():
        return str(candidate)
    return shutil.which("nvcc")


def build_blocker() -> str | None:
    """Why the extension cannot be compiled here (None when it can)."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if _nvcc() is None:
        return "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    return None


def cache_dir() -> Path:
    version = f"torch{torch.__version__}-cu{torch.version.cuda}"
    default = Path.home() / ".cache" / "secateurs" / "cuda_ext" / version
    return Path(os.environ.get("SECATEURS_CUDA_CACHE", default))


def aot_extension():  # -> torch.utils.cpp_extension.CUDAExtension | None
    """``CUDAExtension("cuda_ext._C")`` for a setup.py, only when SECATEURS_BUILD_CUDA=1 and it can build."""
    if os.environ.get("SECATEURS_BUILD_CUDA") != "1":
        return None
    blocker = build_blocker()
    if blocker is not None:
        logger.warning("SECATEURS_BUILD_CUDA=1 but the CUDA extension is skipped: %s", blocker)
        return None
    from torch.utils.cpp_extension import CUDAExtension

    return CUDAExtension(
        "cuda_ext._C",
        sources=[str(Path("cuda_ext") / "csrc" / s) for s in SOURCES],
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
    )


def jit_build(verbose: bool = False) -> ModuleType:
    """Compile (or reuse) the extension in :func:`cache_dir` with torch's JIT loader. Raises on failure."""
    from torch.utils import cpp_extension

    if JIT_NAME in sys.modules:  # built or loaded earlier in this process (e.g. when cuda_ext was imported)
        return sys.modules[JIT_NAME]
    blocker = build_blocker()
    if blocker is not None:
        raise RuntimeError(blocker)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"  # no device to detect the architecture from
    build_dir = cache_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    logger.info(
        "building the CUDA extension %s in %s (nvcc %s, arch %s)",
        JIT_NAME,
        build_dir,
        _nvcc(),
        os.environ.get("TORCH_CUDA_ARCH_LIST", "of the visible GPU"),
    )
    module = cpp_extension.load(
        name=JIT_NAME,
        sources=[str(CSRC / s) for s in SOURCES],
        extra_cflags=CXX_FLAGS,
        extra_cuda_cflags=NVCC_FLAGS,
        build_directory=str(build_dir),
        verbose=verbose,
    )
    logger.info("CUDA extension ready: %s", module.__file__)
    sys.modules.setdefault(JIT_NAME, module)
    return module


def load_extension() -> ModuleType | None:
    """The extension module, or None (then :func:`unavailable_reason` says why). Tried once per process.

    Order: a prebuilt ``cuda_ext._C``; else, with a CUDA device visible, the JIT build (cached: compiles
    only the first time, logged); ``SECATEURS_NO_JIT=1`` forbids that build.
    """
    if _state["tried"]:
        return _state["module"]  # type: ignore[return-value]
    _state["tried"] = True
    _state["module"], _state["reason"] = _load()
    return _state["module"]  # type: ignore[return-value]


def unavailable_reason() -> str:
    """Why :func:`load_extension` returned None ("" when it returned a module)."""
    return "" if _state["module"] is not None else str(_state["reason"])


def _load() -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module("cuda_ext._C"), ""
    except ImportError as exc:
        prebuilt_error = f"no prebuilt cuda_ext._C ({exc})"
    if not torch.cuda.is_available():
        return None, f"{prebuilt_error}; no CUDA device visible (torch.cuda.is_available() is False)"
    blocker = build_blocker()
    if blocker is not None:
        return None, f"{prebuilt_error}; cannot build it here: {blocker}"
    if os.environ.get("SECATEURS_NO_JIT") == "1":
        return None, f"{prebuilt_error}; JIT build disabled by SECATEURS_NO_JIT=1"
    logger.info(
        "%s: JIT-building it once (run `python -m cuda_ext.build` to do this ahead of time)", prebuilt_error
    )
    try:
        return jit_build(), ""
    except Exception as exc:  # a failed build must leave the torch reference working
        return None, f"JIT build failed: {type(exc).__name__}: {exc}"


def cpu_build(verbose: bool = False) -> ModuleType:
    """Compile (or reuse) the CPU extension in :func:`cuda_ext.cpu_impl.cache_dir`. Raises on failure."""
    from torch.utils import cpp_extension

    from cuda_ext import cpu_impl

    if cpu_impl.JIT_NAME in sys.modules:
        return sys.modules[cpu_impl.JIT_NAME]
    build_dir = cpu_impl.cache_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    logger.info("building the CPU extension %s in %s", cpu_impl.JIT_NAME, build_dir)
    module = cpp_extension.load(
        name=cpu_impl.JIT_NAME,
        sources=[str(cpu_impl.CSRC / s) for s in cpu_impl.SOURCES],
        extra_cflags=cpu_impl.CXX_FLAGS,
        extra_ldflags=cpu_impl.LD_FLAGS,
        build_directory=str(build_dir),
        with_cuda=False,
        verbose=verbose,
    )
    sys.modules.setdefault(cpu_impl.JIT_NAME, module)
    return module


def main(argv: list[str] | None = None) -> int:
    """``python -m cuda_ext.build [-v] [--cpu]``: build the CPU extension, then (unless ``--cpu``) the CUDA one
    where it can build. Exit 0: built (a CUDA build that cannot run here is logged, not failed); 1: a build failed.
    """
    argv = sys.argv[1:] if argv is None else argv
    verbose = "-v" in argv or "--verbose" in argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    started = time.perf_counter()
    try:
        module = cpu_build(verbose=verbose)
    except Exception as exc:
        logger.error("CPU extension build failed: %s: %s", type(exc).__name__, exc)
        return 1
    print(f"CPU extension {module.__name__} ready in {time.perf_counter() - started:.0f} s: {module.__file__}")
    if "--cpu" in argv:
        return 0
    blocker = build_blocker()
    if blocker is not None:
        logger.info("CUDA extension not built: %s", blocker)
        return 0
    try:
        module = jit_build(verbose=verbose)
    except Exception as exc:
        logger.error("CUDA extension build failed: %s: %s", type(exc).__name__, exc)
        return 1
    print(f"built {module.__name__}: {module.__file__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
