"""The bit-plane oracle: layout, lossless packing, dequantisation formula and output rounding."""

import pytest
import torch

from cuda_ext.reference import dequantize, dequantize_codes, pack_bitplanes, quant_matmul, unpack_bitplanes


def _random_format(out: int, n_in: int, bits: int, G: int, n_types: int, with_zeros: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (out, n_in), generator=gen).to(torch.uint8)
    n_groups = -(-n_in // G)
    type_ids = torch.randint(0, n_types, (out, n_groups), generator=gen).to(torch.uint8)
    scales = (torch.rand(out, n_groups, generator=gen) + 0.01).half()
    zeros = torch.randint(0, 2**bits, (out, n_groups), generator=gen).half() if with_zeros else None
    tables = torch.randn(n_types, 2**bits, generator=gen)
    return codes, type_ids, scales, zeros, tables


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n_in", [1, 31, 32, 33, 100])
def test_pack_unpack_is_lossless(bits: int, n_in: int) -> None:
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        codes = torch.randint(0, 2**bits, (5, n_in), generator=gen).to(torch.uint8)
        planes = pack_bitplanes(codes, bits)
        assert planes.dtype == torch.int32 and planes.shape == (bits, 5, -(-n_in // 32))
        assert torch.equal(unpack_bitplanes(planes, bits, n_in), codes)


def test_plane_layout_by_hand() -> None:
    # row 0: codes 1, 2, 3, 0 → plane 0 (LSBs) = 0b0101, plane 1 = 0b0110
    # row 1: code 1 at 31 → plane 0 word 0 = sign bit only; code 3 at 32 → bit 0 of word 1 in both planes
    codes = torch.zeros(2, 33, dtype=torch.uint8)
    codes[0, :4] = torch.tensor([1, 2, 3, 0])
    codes[1, 31], codes[1, 32] = 1, 3
    planes = pack_bitplanes(codes, 2)
    assert planes[:, 0].tolist() == [[0b0101, 0], [0b0110, 0]]
    assert planes[:, 1].tolist() == [[-(2**31), 1], [0, 1]]


def test_padding_bits_are_zero() -> None:
    codes = torch.full((3, 33), 255, dtype=torch.uint8)
    planes = pack_bitplanes(codes, 8)
    assert bool((planes[:, :, 0] == -1).all()) and bool((planes[:, :, 1] == 1).all())


def _dequant_loop(codes, type_ids, scales, zeros, tables, G) -> torch.Tensor:
    out = torch.empty(codes.shape, dtype=torch.float32)
    for o in range(codes.shape[0]):
        for i in range(codes.shape[1]):
            g = i // G
            value = tables[int(type_ids[o, g]), int(codes[o, i])]
            zero = zeros[o, g].float() if zeros is not None else torch.tensor(0.0)
            out[o, i] = (value - zero) * scales[o, g].float()
    return out


@pytest.mark.parametrize("with_zeros", [False, True])
def test_dequantize_equals_per_element_loop(with_zeros: bool) -> None:
    codes, type_ids, scales, zeros, tables = _random_format(3, 45, 3, 16, 4, with_zeros)
    planes = pack_bitplanes(codes, 3)
    expected = _dequant_loop(codes, type_ids, scales, zeros, tables, 16)
    assert torch.equal(dequantize(planes, type_ids, scales, zeros, tables, 45, 16, torch.float32), expected)
    for dtype in (torch.float16, torch.bfloat16):
        got = dequantize(planes, type_ids, scales, zeros, tables, 45, 16, dtype)
        assert got.dtype == dtype and torch.equal(got, expected.to(dtype))


def test_output_rounding_is_nearest_even() -> None:
    # products exactly halfway between two representable values: RNE picks the even mantissa
    half_fp16, half_bf16 = 2.0**-11, 2.0**-8
    table = torch.tensor([[1 + half_fp16, 1 + 3 * half_fp16, 1 + half_bf16, 1 + 3 * half_bf16]])
    codes = torch.tensor([[0, 1, 2, 3]], dtype=torch.uint8)
    args = (torch.zeros(1, 1, dtype=torch.uint8), torch.ones(1, 1).half(), None, table, 4)
    fp16 = dequantize_codes(codes, *args, out_dtype=torch.float16)
    bf16 = dequantize_codes(codes, *args, out_dtype=torch.bfloat16)
    assert fp16[0, :2].tolist() == [1.0, 1 + 4 * half_fp16]
    assert bf16[0, 2:].tolist() == [1.0, 1 + 4 * half_bf16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_matmul_is_dequant_then_matmul(dtype: torch.dtype) -> None:
    codes, type_ids, scales, zeros, tables = _random_format(6, 40, 4, 32, 2, True)
    planes = pack_bitplanes(codes, 4)
    x = torch.randn(2, 3, 40).to(dtype)
    y = quant_matmul(x, planes, type_ids, scales, zeros, tables, 40, 32)
    weight = dequantize(planes, type_ids, scales, zeros, tables, 40, 32, dtype)
    assert y.dtype == dtype and y.shape == (2, 3, 6) and torch.equal(y, x @ weight.T)


def test_malformed_tensors_raise_value_error() -> None:
    codes, type_ids, scales, zeros, tables = _random_format(2, 10, 4, 8, 1, False)
    planes = pack_bitplanes(codes, 4)
    with pytest.raises(ValueError, match="bits"):
        pack_bitplanes(codes, 5)
    with pytest.raises(ValueError, match="codes must be < 2\\*\\*bits"):
        pack_bitplanes(codes | 8, 3)
    with pytest.raises(ValueError, match="planes"):
        unpack_bitplanes(planes, 4, 40)
    with pytest.raises(ValueError, match="scales"):
        dequantize(planes, type_ids, scales.float(), zeros, tables, 10, 8)
    with pytest.raises(ValueError, match="x must be"):
        quant_matmul(torch.randn(1, 9), planes, type_ids, scales, zeros, tables, 10, 8)
