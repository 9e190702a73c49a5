"""CUDA kernels of cuda_ext/csrc against cuda_ext.reference: dequantisation bit for bit, the fused GEMV within
its fp32-accumulation error bound. Needs a CUDA device and the extension (``python -m cuda_ext.build``)."""

from __future__ import annotations

import itertools

import pytest
import torch

from cuda_ext import build, reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

BITS = (2, 3, 4, 8)
GROUPS = (32, 64, 128)
IN_FEATURES = (1, 31, 33, 100, 4097)
OUT_FEATURES = (1, 7, 129)
RAW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


@pytest.fixture(scope="module")
def ext():
    module = build.load_extension()
    if module is None:
        pytest.skip(f"CUDA extension unavailable: {build.unavailable_reason()}")
    return module


Packed = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]


def random_packed(
    bits: int, out_f: int, in_f: int, group_size: int, zeros: bool, seed: int, n_types: int = 4
) -> Packed:
    """Random codes packed with the reference, random per-group types/scales/zeros and tables, on the GPU."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=g).to(torch.uint8)
    n_groups = -(-in_f // group_size)
    type_ids = torch.randint(0, n_types, (out_f, n_groups), generator=g).to(torch.uint8)
    scales = (torch.rand(out_f, n_groups, generator=g) * 0.1 + 1e-3).half()
    zero_points = (torch.randn(out_f, n_groups, generator=g) * 4).half().cuda() if zeros else None
    tables = torch.randn(n_types, 2**bits, generator=g) * 3
    planes = reference.pack_bitplanes(codes, bits)
    return planes.cuda(), type_ids.cuda(), scales.cuda(), zero_points, tables.cuda()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("zeros", [True, False], ids=["zeros", "nozeros"])
def test_dequantize_bit_exact(ext, bits: int, dtype: torch.dtype, group_size: int, zeros: bool) -> None:
    for seed, (out_f, in_f) in enumerate(itertools.product(OUT_FEATURES, IN_FEATURES)):
        packed = random_packed(bits, out_f, in_f, group_size, zeros, seed)
        got = ext.dequantize(*packed, in_f, group_size, dtype)
        want = reference.dequantize(*packed, in_f, group_size, dtype)
        assert got.shape == want.shape and got.dtype == dtype
        assert torch.equal(got.view(RAW[dtype]), want.view(RAW[dtype])), f"out={out_f} in={in_f}"


@pytest.mark.parametrize("bits", BITS)
def test_dequantize_float32_and_per_channel(ext, bits: int) -> None:
    for in_f, group_size in ((4097, 128), (100, 100), (1000, 4096)):
        packed = random_packed(bits, 65, in_f, group_size, True, seed=in_f)
        got = ext.dequantize(*packed, in_f, group_size, torch.float32)
        want = reference.dequantize(*packed, in_f, group_size, torch.float32)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def gemv_error_bound(
    x: torch.Tensor, w32: torch.Tensor, weights_rounded: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact y in fp64, bound on |y - exact|) for fp32 accumulation of x @ w32^T and one rounding to x.dtype.

    Per term, fp32 accumulation contributes at most in * 2**-24 relative to sum |x||w| (+64: the per-word
    scale/zero fold); the dequant + cuBLAS path also rounds each weight to x.dtype first (eps/2 relative).
    """
    exact = x.double() @ w32.double().T
    magnitude = x.double().abs() @ w32.double().abs().T
    eps = torch.finfo(x.dtype).eps
    per_term = (x.shape[-1] + 64) * 2.0**-24 + (eps / 2 if weights_rounded else 0.0)
    return exact, magnitude * per_term + exact.abs() * eps / 2


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5, 6, 7, 8, 16])
def test_quant_matmul_within_fp32_bound(
    ext, bits: int, dtype: torch.dtype, batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # cuBLAS (batch > 8) must accumulate in fp32 too for the bound to hold.
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_fp16_reduced_precision_reduction", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", False)
    shapes = [(129, 4097, 128, True), (7, 100, 32, False), (64, 4096, 64, True), (33, 16384, 128, False)]
    for seed, (out_f, in_f, group_size, zeros) in enumerate(shapes):
        packed = random_packed(bits, out_f, in_f, group_size, zeros, seed)
        x = torch.randn(batch, in_f, generator=torch.Generator().manual_seed(seed)).to(dtype).cuda()
        y = ext.quant_matmul(x, *packed, in_f, group_size)
        assert y.shape == (batch, out_f) and y.dtype == dtype
        w32 = reference.dequantize(*packed, in_f, group_size, torch.float32)
        exact, bound = gemv_error_bound(x, w32, weights_rounded=batch > 8)
        err = (y.double() - exact).abs()
        assert torch.isfinite(y).all() and (err <= bound).all(), (
            f"out={out_f} in={in_f} G={group_size}: max err/bound {(err / bound).max().item():.3g}"
        )


def test_registered_ops_dispatch_to_cuda(ext) -> None:
    from cuda_ext import ops

    assert ops.backend() == "cuda"
    packed = random_packed(4, 96, 4096, 128, True, seed=7)
    dense = torch.ops.secateurs.dequantize(*packed, 4096, 128, torch.bfloat16)
    assert torch.equal(
        dense.view(torch.int16), ext.dequantize(*packed, 4096, 128, torch.bfloat16).view(torch.int16)
    )
    x = torch.randn(2, 3, 4096, device="cuda", dtype=torch.float16)  # leading dims: flattened to a batch of 6
    y = torch.ops.secateurs.quant_matmul(x, *packed, 4096, 128)
    assert y.shape == (2, 3, 96)
    assert torch.equal(y.reshape(6, 96), ext.quant_matmul(x.reshape(6, 4096), *packed, 4096, 128))


def test_rejects_bad_input(ext) -> None:
    planes, type_ids, scales, zero_points, tables = random_packed(4, 8, 64, 32, True, seed=0)
    with pytest.raises(RuntimeError, match="scales"):
        ext.dequantize(planes, type_ids, scales.float(), zero_points, tables, 64, 32, torch.float16)
    with pytest.raises(RuntimeError, match="group_size"):
        ext.dequantize(planes, type_ids, scales, zero_points, tables, 64, 48, torch.float16)
    with pytest.raises(RuntimeError, match="must be on"):
        ext.dequantize(planes, type_ids.cpu(), scales, zero_points, tables, 64, 32, torch.float16)
