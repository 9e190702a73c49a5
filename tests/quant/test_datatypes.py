"""Value tables of quant/datatypes.py against the published definitions."""

import pytest
import torch

from quant.datatypes import DATATYPE_SETS, MAX_TYPES_PER_SET, Datatype, DatatypeSet, get_datatype_set
from quant.errors import InputError

FP4 = {0.0, 1.0, -1.0, 2.0, -2.0, 3.0, -3.0, 4.0, -4.0, 6.0, -6.0, 8.0, -8.0, 12.0, -12.0}
FP3 = {0.0, 1.0, -1.0, 2.0, -2.0, 4.0, -4.0}
# bitsandbytes.functional.get_4bit_type("nf4"), copied independently of the implementation
BNB_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]  # fmt: skip
EXPECTED_SETS = {
    "bitmod4", "bitmod3", "fp4", "fp3", "int4_sym", "int4_asym", "int3_sym", "int3_asym", "int8_sym",
    "int8_asym", "nf4", "ant4", "ant3", "mxfp4",
}  # fmt: skip


def _values(dtset_name: str, member: int = 0) -> set[float]:
    return set(get_datatype_set(dtset_name).members[member].distinct_values)


@pytest.mark.parametrize("name", sorted(EXPECTED_SETS))
def test_every_set_has_consistent_tables(name: str) -> None:
    dtset = DATATYPE_SETS[name]
    assert dtset.name == name
    assert 1 <= len(dtset.members) <= MAX_TYPES_PER_SET
    assert dtset.tables().shape == (len(dtset.members), 2**dtset.bits)
    assert dtset.tables().dtype == torch.float32
    for member in dtset.members:
        distinct = member.distinct_values
        assert list(distinct) == sorted(set(distinct)), "codes index the table in ascending order"
        assert all(v == 0.0 for v in member.values[len(distinct) :]), "padding is 0.0 at the end"


def test_registry_is_exactly_the_documented_sets() -> None:
    assert set(DATATYPE_SETS) == EXPECTED_SETS


def test_fp_grids() -> None:
    assert _values("fp4") == FP4 and len(FP4) == 15
    assert _values("fp3") == FP3 and len(FP3) == 7


@pytest.mark.parametrize(
    ("name", "base", "extras"),
    [("bitmod4", FP4, [10.0, -10.0, 16.0, -16.0]), ("bitmod3", FP3, [3.0, -3.0, 6.0, -6.0])],
)
def test_bitmod_members_are_fp_plus_one_special_value(
    name: str, base: set[float], extras: list[float]
) -> None:
    dtset = get_datatype_set(name)
    assert [m.name.rsplit("_", 2)[-2:] for m in dtset.members] == [
        ["er", "pos"], ["er", "neg"], ["ea", "pos"], ["ea", "neg"],
    ]  # fmt: skip
    for type_id, extra in enumerate(extras):
        values = dtset.members[type_id].values
        assert len(set(values)) == 2**dtset.bits, "the special value takes the free code: no padding"
        assert set(values) == base | {extra}


def test_nf4_equals_bitsandbytes_constants() -> None:
    assert list(get_datatype_set("nf4").members[0].values) == BNB_NF4
    assert get_datatype_set("nf4").tables()[0].tolist() == torch.tensor(BNB_NF4).tolist()


def test_int_grids() -> None:
    assert _values("int4_sym") == {float(v) for v in range(-7, 8)}
    assert _values("int3_sym") == {float(v) for v in range(-3, 4)}
    assert _values("int8_sym") == {float(v) for v in range(-127, 128)}
    for bits in (3, 4, 8):
        member = get_datatype_set(f"int{bits}_asym").members[0]
        assert member.asymmetric and member.values == tuple(float(v) for v in range(2**bits))
        assert get_datatype_set(f"int{bits}_asym").asymmetric
    assert not get_datatype_set("bitmod4").asymmetric


def test_ant_sets_choose_between_int_and_flint() -> None:
    assert [m.name for m in get_datatype_set("ant4").members] == ["int4_sym", "flint4"]
    assert _values("ant4", 1) == (FP4 - {12.0, -12.0}) | {16.0, -16.0}
    assert _values("ant3", 0) == _values("int3_sym") and _values("ant3", 1) == FP3


def test_mxfp4_is_e2m1_with_power_of_two_scale_per_32() -> None:
    dtset = get_datatype_set("mxfp4")
    assert dtset.group_size == 32 and dtset.members[0].pow2_scale
    assert _values("mxfp4") == {v / 2 for v in FP4}


def test_unknown_set_names_the_known_ones() -> None:
    with pytest.raises(InputError, match="dtset_name.*bitmod4"):
        get_datatype_set("bitmod5")


def test_invalid_definitions_are_rejected() -> None:
    with pytest.raises(InputError, match="2\\*\\*bits"):
        Datatype("bad", 4, (0.0, 1.0))
    with pytest.raises(InputError, match="ascending"):
        Datatype("bad", 2, (1.0, 0.0, -1.0, 2.0))
    member = get_datatype_set("fp4").members[0]
    with pytest.raises(InputError, match="members"):
        DatatypeSet("too_many", 4, (member,) * 5)
