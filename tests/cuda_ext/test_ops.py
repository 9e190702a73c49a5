"""torch.ops.secateurs.*: equal to the reference, opcheck-clean, shape-only fake impls, CPU fallback."""

import logging
import sys
import types

import pytest
import torch

import cuda_ext
from cuda_ext import ops, reference

Packed = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, int, int]


def _packed(with_zeros: bool, out: int = 5, n_in: int = 37, bits: int = 3, G: int = 16) -> Packed:
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 2**bits, (out, n_in), generator=gen).to(torch.uint8)
    n_groups = -(-n_in // G)
    type_ids = torch.randint(0, 4, (out, n_groups), generator=gen).to(torch.uint8)
    scales = (torch.rand(out, n_groups, generator=gen) + 0.1).half()
    zeros = torch.randint(0, 2**bits, (out, n_groups), generator=gen).half() if with_zeros else None
    tables = torch.randn(4, 2**bits, generator=gen)
    return reference.pack_bitplanes(codes, bits), type_ids, scales, zeros, tables, n_in, G


def _on(args: Packed, device: torch.device) -> Packed:
    planes, type_ids, scales, zeros, tables, n_in, G = args
    moved = [t.to(device) for t in (planes, type_ids, scales, tables)]
    return moved[0], moved[1], moved[2], zeros.to(device) if zeros is not None else None, moved[3], n_in, G


@pytest.mark.parametrize("with_zeros", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_ops_equal_reference(with_zeros: bool, dtype: torch.dtype, device: torch.device) -> None:
    args = _on(_packed(with_zeros), device)
    got = torch.ops.secateurs.dequantize(*args, dtype)
    assert got.device.type == device.type
    assert torch.equal(got, reference.dequantize(*args, dtype))
    x = torch.randn(2, 8, args[5]).to(device, dtype)  # 16 rows: above the fused GEMV (test_cpu_kernels.py)
    assert torch.equal(torch.ops.secateurs.quant_matmul(x, *args), reference.quant_matmul(x, *args))


@pytest.mark.parametrize("with_zeros", [False, True])
def test_opcheck(with_zeros: bool) -> None:
    args = _packed(with_zeros, out=3, n_in=20, G=8)
    torch.library.opcheck(torch.ops.secateurs.dequantize.default, (*args, torch.bfloat16))
    x = torch.randn(2, 20, requires_grad=True)
    torch.library.opcheck(torch.ops.secateurs.quant_matmul.default, (x, *args))


def test_fake_impls_give_shapes_and_dtypes() -> None:
    planes, type_ids, scales, zeros, tables, n_in, G = _packed(True)
    assert zeros is not None
    planes, type_ids, scales, zeros, tables = (
        t.to("meta") for t in (planes, type_ids, scales, zeros, tables)
    )
    w = torch.ops.secateurs.dequantize(planes, type_ids, scales, zeros, tables, n_in, G, torch.bfloat16)
    assert w.device.type == "meta" and w.shape == (5, n_in) and w.dtype == torch.bfloat16
    x = torch.empty(2, 7, n_in, dtype=torch.float16, device="meta")
    y = torch.ops.secateurs.quant_matmul(x, planes, type_ids, scales, zeros, tables, n_in, G)
    assert y.shape == (2, 7, 5) and y.dtype == torch.float16


def test_gradient_wrt_x_is_that_of_the_dense_matmul(device: torch.device) -> None:
    args = _on(_packed(True), device)
    x = torch.randn(3, args[5], device=device, requires_grad=True)
    torch.ops.secateurs.quant_matmul(x, *args).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    (x_ref @ reference.dequantize(*args, torch.float32).T).square().sum().backward()
    assert x.grad is not None and x_ref.grad is not None
    assert torch.allclose(x.grad, x_ref.grad)


def test_cpu_fallback_is_the_reference(caplog: pytest.LogCaptureFixture) -> None:
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only path")
    assert cuda_ext.backend() == "torch-reference"
    with caplog.at_level(logging.INFO, logger="secateurs"):
        ops._init_backend()
    messages = [r.getMessage() for r in caplog.records if r.name == "secateurs"]
    assert messages == ["CUDA extension unavailable → torch reference (torch.cuda.is_available() is False)"]


def test_failing_cuda_extension_is_logged_not_raised(monkeypatch, caplog) -> None:
    broken = types.ModuleType("cuda_ext.cuda_impl")

    def register(*ops_):
        raise RuntimeError("kernel build failed")

    broken.register = register  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cuda_ext.cuda_impl", broken)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ops, "_backend", ops._backend)
    with caplog.at_level(logging.INFO, logger="secateurs"):
        ops._init_backend()
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "RuntimeError: kernel build failed" in caplog.records[0].getMessage()
    assert ops.backend() == "torch-reference"
