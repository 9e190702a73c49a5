"""quant.pack: codes ↔ bit planes, checked against a by-hand bit layout."""

from __future__ import annotations

import pytest
import torch

from quant.pack import QuantizedWeight, pack_weight, unpack_weight


def _weight(bits: int, out: int, n_in: int, group: int, seed: int = 0) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    n_groups = -(-n_in // group)
    return QuantizedWeight(
        codes=torch.randint(0, 2**bits, (out, n_in), generator=g, dtype=torch.uint8),
        type_ids=torch.randint(0, 2, (out, n_groups), generator=g, dtype=torch.uint8),
        scales=torch.rand(out, n_groups, generator=g).half() + 0.5,
        zeros=None,
        tables=torch.randn(2, 2**bits, generator=g),
        bits=bits,
        group_size=group,
        in_features=n_in,
    )


@pytest.mark.parametrize(("bits", "n_in"), [(3, 64), (4, 96), (4, 70), (2, 33)])
def test_pack_then_unpack_is_the_identity(bits: int, n_in: int) -> None:
    qw = _weight(bits, 5, n_in, 32)
    back = unpack_weight(pack_weight(qw))
    assert torch.equal(back.codes, qw.codes)
    assert torch.equal(back.dequantize(), qw.dequantize())


def test_plane_bits_follow_the_documented_layout() -> None:
    """Plane b, row r, word w, bit j holds bit b of code[r, 32·w + j] (padding columns are zero)."""
    qw = _weight(4, 3, 70, 32, seed=1)
    planes = pack_weight(qw).planes
    assert planes.shape == (4, 3, 3) and planes.dtype == torch.int32
    for b in range(4):
        for r in range(3):
            for col in range(96):
                word = int(planes[b, r, col // 32]) & 0xFFFFFFFF
                expected = (int(qw.codes[r, col]) >> b) & 1 if col < 70 else 0
                assert (word >> (col % 32)) & 1 == expected
