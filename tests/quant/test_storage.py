"""On-disk metadata codec (format version 2): bit packing, the 8-bit scale grid, encode → decode round trips of
every layout, byte counts at the paper's cost, and module save/load through the HF quantizer's helpers."""

import pytest
import torch
from torch import nn

from quant.errors import InputError
from quant.hf import decode_loaded, empty_quant_linear, metadata_bytes, module_spec
from quant.quantize import quantize_linear
from quant.storage import (
    SCALE_BLOCK_ROWS,
    choose_layout,
    decode_metadata,
    decode_scales,
    encode_metadata,
    encode_scales,
    expand_ceiling,
    pack_bits,
    scale_block_ceiling,
    snap_scales,
    unpack_bits,
)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_pack_bits_round_trips(bits: int) -> None:
    values = torch.randint(0, 2**bits, (37, 5), generator=torch.Generator().manual_seed(bits)).to(torch.uint8)
    packed = pack_bits(values, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-values.numel() * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, values.numel()).view(37, 5), values)


def test_pack_bits_by_hand_and_range_check() -> None:
    assert pack_bits(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b00111001]
    with pytest.raises(InputError, match="0..3"):
        pack_bits(torch.tensor([4]), 2)


def test_scale_grid_decodes_what_it_snapped_and_is_a_log_grid() -> None:
    ceiling = expand_ceiling(scale_block_ceiling(torch.tensor([[0.8], [0.1]])), 2).expand(2, 1)
    assert torch.equal(ceiling, torch.full((2, 1), 0.8))  # one block of 256 rows shares one ceiling
    wanted = torch.tensor([[0.8], [0.1]])
    codes, scales = snap_scales(wanted, ceiling)
    assert codes.tolist() == [[0], [96]]  # 0.1 = 0.8 / 2^3 = 3 octaves × 32 steps
    assert torch.equal(decode_scales(codes, ceiling), scales)
    assert torch.equal(encode_scales(scales, ceiling), codes)
    with pytest.raises(InputError, match="not on the 8-bit scale grid"):
        encode_scales(torch.tensor([[0.79]]).half(), ceiling[:1])


def test_ceiling_is_per_block_of_rows() -> None:
    bound = torch.ones(SCALE_BLOCK_ROWS + 3, 2)
    bound[-1, 1] = 4.0
    hi = scale_block_ceiling(bound)
    assert hi.tolist() == [[1.0, 1.0], [1.0, 4.0]]
    assert expand_ceiling(hi, SCALE_BLOCK_ROWS + 3).shape == (SCALE_BLOCK_ROWS + 3, 2)


def _linear(out: int = 300, n_in: int = 256, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n_in, out)


@pytest.mark.parametrize(
    ("name", "scale_bits", "keys"),
    [
        ("bitmod4", 16, {"type_ids_packed", "scales"}),
        ("bitmod3", 8, {"type_ids_packed", "scale_codes", "scale_hi"}),
        ("nf4", 16, {"scales"}),
        ("int4_asym", 8, {"scale_codes", "scale_hi", "zeros_packed"}),
        ("int3_asym", 16, {"scales", "zeros_packed"}),
    ],
)
def test_metadata_round_trips(name: str, scale_bits: int, keys: set[str]) -> None:
    q = quantize_linear(_linear(), name, 64, scale_bits=scale_bits, compact_storage=True)
    layout = choose_layout(q.type_ids, q.tables, q.zeros, q.bits, name, getattr(q, "scale_hi", None))
    memory = {"type_ids": q.type_ids, "scales": q.scales, "zeros": q.zeros, "tables": q.tables}
    disk = encode_metadata(memory, layout, getattr(q, "scale_hi", None))
    assert set(disk) == keys  # tables come from the registry, single-type sets store no ids
    back = decode_metadata(disk, layout, q.out_features, 4, name)
    for key, value in memory.items():
        assert (value is None and back[key] is None) or torch.equal(back[key], value), key


def test_bits_per_weight_at_the_paper_cost() -> None:
    def bits(name: str, scale_bits: int) -> float:
        q = quantize_linear(_linear(512, 1024), name, 128, scale_bits=scale_bits, compact_storage=True)
        return 8 * metadata_bytes(q) / (512 * 1024)

    assert bits("bitmod4", 16) == pytest.approx(4 + 18 / 128)
    assert bits("bitmod4", 8) == pytest.approx(4 + 10 / 128, abs=2e-3)  # ≈ 4.08 with the block ceilings
    assert bits("int4_asym", 8) == pytest.approx(4 + 12 / 128, abs=2e-3)
    assert bits("nf4", 16) == pytest.approx(4 + 16 / 128)


@pytest.mark.parametrize(("name", "scale_bits"), [("bitmod4", 8), ("int4_asym", 16), ("nf4", 8)])
def test_module_state_dict_encodes_and_the_loader_decodes(name: str, scale_bits: int) -> None:
    q = quantize_linear(_linear(), name, 64, scale_bits=scale_bits, compact_storage=True)
    state = q.state_dict()
    assert "type_ids" not in state and "tables" not in state
    spec = module_spec(q, name)
    fresh = empty_quant_linear(spec, device="meta")
    fresh.load_state_dict(state, strict=True, assign=True)
    decode_loaded(fresh, spec)
    for key in ("type_ids", "scales", "tables", "zeros", "weight", "bias"):
        a, b = getattr(q, key), getattr(fresh, key)
        assert (a is None and b is None) or torch.equal(a, b), key
    x = torch.randn(3, 256)
    assert torch.equal(fresh(x), q(x))
    assert set(fresh.state_dict()) == set(state)  # re-saving writes the compact form again


def test_in_memory_layout_is_the_default_for_plain_modules() -> None:
    q = quantize_linear(_linear(), "bitmod4", 64)
    assert {"type_ids", "scales", "tables"} <= set(q.state_dict()) and "storage" not in module_spec(q, "bitmod4")
