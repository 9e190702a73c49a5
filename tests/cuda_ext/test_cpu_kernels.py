"""cuda_ext/csrc/cpu against the reference (cuda_ext.reference): the C++ CPU kernels, each instruction-set tier.

Every datatype set of quant.datatypes (its bits, tables, type count, zero points), group sizes that fill whole
32-code words, split them, or cover the whole row, ragged shapes, 1..8 activation rows, 1 and 2 threads.
``dequantize`` must be bit-exact; the fused GEMV within its stated bound (cuda_ext.cpu_impl). Needs the CPU
extension (``python -m cuda_ext.build``): skipped without it, failed instead when SECATEURS_REQUIRE_CPU_KERNELS=1
(as in CI).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest
import torch

from cuda_ext import cpu_impl, ops, reference
from quant.datatypes import DATATYPE_SETS, DatatypeSet
from quant.qlinear import QuantLinear, cache_dequantized_weights
from quant.quantize import quantize_linear
from quant.select import choose_group_datatypes

EXT = cpu_impl.load_extension()
if EXT is None:
    reason = f"CPU extension not available: {cpu_impl.unavailable_reason()}"
    if os.environ.get("SECATEURS_REQUIRE_CPU_KERNELS") == "1":
        raise RuntimeError(reason + " (SECATEURS_REQUIRE_CPU_KERNELS=1)")
    pytest.skip(reason, allow_module_level=True)

Packed = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, int, int]
# (out, in): ragged last word / group, whole words, one weight; 1100: two 512-code chunks of the AVX-512 GEMV and a
# ragged third one (2 words + 12 codes)
SHAPES = ((7, 37), (5, 256), (3, 300), (2, 1), (3, 1100))
KERNELS = list(EXT.supported_isas())  # e.g. ["portable", "avx2", "avx512"]: every tier this CPU runs


def _packed(dtset: DatatypeSet, out: int, n_in: int, group_size: int, seed: int = 0) -> Packed:
    """Random codes (padding codes included) with the set's own tables, type ids and zero points."""
    gen = torch.Generator().manual_seed(seed)
    n_groups = -(-n_in // group_size)
    codes = torch.randint(0, 2**dtset.bits, (out, n_in), generator=gen).to(torch.uint8)
    tables = dtset.tables()
    type_ids = torch.randint(0, tables.shape[0], (out, n_groups), generator=gen).to(torch.uint8)
    scales = (torch.rand(out, n_groups, generator=gen) * 0.2 + 1e-3).half()
    zeros = None
    if dtset.asymmetric:
        zeros = torch.randint(0, 2**dtset.bits, (out, n_groups), generator=gen).half()
    return reference.pack_bitplanes(codes, dtset.bits), type_ids, scales, zeros, tables, n_in, group_size


def _group_sizes(dtset: DatatypeSet, n_in: int) -> list[int]:
    if dtset.group_size is not None:  # MX: the format fixes the block
        return [dtset.group_size]
    if n_in > 512:  # the AVX-512 chunks: one group each quad, two quads per group, one group per row
        return [128, 256, n_in]
    return sorted({32, 64, 128, 16, 24, n_in, n_in + 5})  # 16, 24: groups that split a 32-code word


def _cases() -> Iterator[tuple[str, int, int, int]]:
    for name, dtset in DATATYPE_SETS.items():
        for out, n_in in SHAPES:
            for group_size in _group_sizes(dtset, n_in):
                yield name, out, n_in, group_size


def _within_gemv_bound(y: torch.Tensor, x: torch.Tensor, packed: Packed, weight: torch.Tensor | None = None):
    """|y − x Ŵᵀ| ≤ 2·n·2⁻²⁴·(|x| @ |Ŵ|ᵀ): two fp32 dot products of length n in any order (cpu_impl).

    x Ŵᵀ is the reference's quant_matmul (Ŵ: the reference's fp32 dequantisation, passed in to save time)."""
    weight = reference.dequantize(*packed, torch.float32) if weight is None else weight
    bound = 2 * max(packed[5], 1) * 2.0**-24 * (x.abs() @ weight.abs().T)
    return (y - x @ weight.T).abs() <= bound


@pytest.fixture(params=KERNELS)
def kernel(request: pytest.FixtureRequest) -> Iterator[str]:
    assert EXT is not None
    EXT.set_max_isa(request.param)
    yield request.param
    EXT.set_max_isa(KERNELS[-1])


@pytest.fixture(params=[1, 2])
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.usefixtures("kernel", "threads")
@pytest.mark.parametrize("name", sorted(DATATYPE_SETS))
def test_dequantize_is_bit_exact(name: str) -> None:
    assert EXT is not None
    for case_name, out, n_in, group_size in _cases():
        if case_name != name:
            continue
        packed = _packed(DATATYPE_SETS[name], out, n_in, group_size)
        for dtype in reference.OUT_DTYPES:
            got = EXT.dequantize(*packed, dtype)
            assert torch.equal(got, reference.dequantize(*packed, dtype)), (out, n_in, group_size, dtype)


@pytest.mark.usefixtures("kernel", "threads")
@pytest.mark.parametrize("name", sorted(DATATYPE_SETS))
def test_fused_gemv_is_within_the_fp32_summation_bound(name: str) -> None:
    assert EXT is not None
    gen = torch.Generator().manual_seed(1)
    for case_name, out, n_in, group_size in _cases():
        if case_name != name:
            continue
        packed = _packed(DATATYPE_SETS[name], out, n_in, group_size)
        weight = reference.dequantize(*packed, torch.float32)
        for batch in range(1, 9):
            x = torch.randn(batch, n_in, generator=gen)
            within = _within_gemv_bound(EXT.gemv(x, *packed), x, packed, weight)
            assert within.all(), (out, n_in, group_size, batch)


@pytest.mark.usefixtures("kernel")
def test_the_gemv_bound_catches_a_wrong_weight() -> None:
    """One flipped code bit moves y far outside the bound (every kernel tier): the bound test can fail."""
    assert EXT is not None
    packed = _packed(DATATYPE_SETS["bitmod4"], 4, 256, 128)
    x = torch.randn(1, 256)
    broken = packed[0].clone()
    broken[3, 2, 5] ^= 1 << 7
    assert not _within_gemv_bound(EXT.gemv(x, broken, *packed[1:]), x, packed).all()


@pytest.mark.usefixtures("kernel")
def test_results_do_not_depend_on_the_thread_count() -> None:
    assert EXT is not None
    packed = _packed(DATATYPE_SETS["bitmod4"], 301, 640, 128)
    x = torch.randn(5, 640)
    before = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append((EXT.gemv(x, *packed), EXT.dequantize(*packed, torch.float32)))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_ops_dispatch_to_the_cpu_kernels() -> None:
    assert ops.cpu_backend() == "cpu-kernels" and cpu_impl.fused_max_batch() == cpu_impl.GEMV_MAX_BATCH
    packed = _packed(DATATYPE_SETS["ant4"], 6, 96, 32)
    for rows in (1, cpu_impl.GEMV_MAX_BATCH):  # fused: within the bound; reference_only: exactly the reference
        x = torch.randn(rows, 96)
        assert _within_gemv_bound(torch.ops.secateurs.quant_matmul(x, *packed), x, packed).all()
        with cpu_impl.reference_only():
            assert ops.cpu_backend() == "torch-reference"
            assert torch.equal(torch.ops.secateurs.quant_matmul(x, *packed), reference.quant_matmul(x, *packed))
    bf16 = torch.bfloat16
    assert torch.equal(torch.ops.secateurs.dequantize(*packed, bf16), reference.dequantize(*packed, bf16))


@pytest.mark.parametrize("dtype", reference.OUT_DTYPES)
def test_above_the_fused_batch_and_for_half_inputs_the_op_is_exact(dtype: torch.dtype) -> None:
    rows = cpu_impl.GEMV_MAX_BATCH + 1 if dtype == torch.float32 else 2
    # a large, a small, then the large layer again: the fp32 path reuses one scratch buffer for Ŵ
    for name, out, n_in in (("int4_asym", 40, 300), ("bitmod3", 9, 70), ("int4_asym", 40, 300)):
        packed = _packed(DATATYPE_SETS[name], out, n_in, 32, seed=out)
        x = torch.randn(2, rows, n_in).to(dtype)
        assert torch.equal(torch.ops.secateurs.quant_matmul(x, *packed), reference.quant_matmul(x, *packed))


def test_dequantized_weight_cache_gives_the_same_outputs() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    qlinear = quantize_linear(linear, "bitmod4", group_size=32)
    x = torch.randn(3, 7, 96)  # 21 rows: above the fused threshold
    expected = qlinear(x)
    assert cache_dequantized_weights(torch.nn.Sequential(qlinear)) == 1
    assert torch.equal(qlinear(x), expected) and torch.equal(qlinear(x), expected)
    other = quantize_linear(torch.nn.Linear(96, 40), "bitmod4", group_size=32)
    qlinear.load_state_dict(other.state_dict())  # in-place buffer update: the cache must follow
    with torch.no_grad():
        assert torch.equal(qlinear(x), other(x))
    qlinear.cache_dequantized(False)
    assert torch.equal(qlinear(x[:1, :1]), other(x[:1, :1]))  # one row: the fused path


def test_missing_extension_is_logged_once(monkeypatch, caplog) -> None:
    monkeypatch.setattr(cpu_impl, "load_extension", lambda: None)
    monkeypatch.setattr(cpu_impl, "unavailable_reason", lambda: "not built")
    monkeypatch.setitem(cpu_impl._state, "logged", False)
    with caplog.at_level(logging.INFO, logger="secateurs"):
        assert not cpu_impl.register(object(), object())
        assert not cpu_impl.register(object(), object())
    messages = [r.getMessage() for r in caplog.records if r.name == "secateurs"]
    assert messages == ["CPU kernels unavailable → torch reference (not built)"]


def test_quant_linear_uses_the_kernels_end_to_end() -> None:
    layer = QuantLinear.from_quantized(choose_group_datatypes(torch.randn(33, 200), "nf4", 64))
    x = torch.randn(2, 200)
    y = layer(x)  # the direct call of the fused GEMV, without the op dispatcher
    packed = (layer.planes, layer.type_ids, layer.scales, layer.zeros, layer.tables, 200, 64)
    assert _within_gemv_bound(y, x, packed).all()
    assert torch.equal(y, torch.ops.secateurs.quant_matmul(x, *packed))  # the same kernel through the op
    x_grad = x.clone().requires_grad_()
    assert torch.equal(layer(x_grad), y)  # autograd goes through the op: same values
