"""transformers integration: a quantization config and an ``HfQuantizer`` for Secateurs' packed checkpoints.

``config.json["quantization_config"]`` = {"quant_method": "secateurs_bitmod", "format_version": 2, "modules":
{name: spec}} where spec gives in/out features, bits, group size, number of datatypes, zero points, bias, the
datatype-set name and (version 2) ``storage``: the compact on-disk layout of the metadata (:mod:`quant.storage`).
Before weights load, the quantizer swaps each listed ``nn.Linear`` for an empty :class:`QuantLinear` of that spec
holding the *disk* tensors; after loading they are decoded into the in-memory layout the kernels read. A spec
without ``storage`` (format version 1) is the in-memory layout verbatim. Saving goes the other way through a
state-dict hook that :func:`use_compact_storage` puts on each module. Importing this module (``import quant``
does) registers the config and the quantizer with transformers.

Without the registration transformers would only warn about an unknown ``quant_method`` and skip it; our packed
planes are stored under ``weight`` with a different shape, so such a load stops with a size-mismatch error
instead of producing garbage.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from quant.errors import InputError
from quant.qlinear import QuantLinear
from quant.storage import FORMAT_VERSION, DiskLayout, choose_layout, decode_metadata, disk_shapes, encode_metadata

QUANT_METHOD = "secateurs_bitmod"
DISK_ONLY = ("type_ids_packed", "scale_codes", "scale_hi", "zeros_packed")


def _layout(module: QuantLinear) -> DiskLayout | None:
    """The version-2 layout of ``module`` (None: stored the version-1 way, in-memory layout verbatim)."""
    if not getattr(module, "compact_storage", False):
        return None
    hi = getattr(module, "scale_hi", None)
    return choose_layout(module.type_ids, module.tables, module.zeros, module.bits, module.dtypes, hi)


def _encode_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, _meta: Any) -> None:
    """state_dict post-hook: replace the in-memory metadata tensors by their compact disk form."""
    assert isinstance(module, QuantLinear)
    layout = _layout(module)
    if layout is None:
        return
    tensors = {k: state_dict.pop(prefix + k, None) for k in ("type_ids", "scales", "zeros", "tables")}
    for key, value in encode_metadata(tensors, layout, getattr(module, "scale_hi", None)).items():
        state_dict[prefix + key] = value


def use_compact_storage(module: QuantLinear, scale_hi: torch.Tensor | None = None) -> QuantLinear:
    """Store ``module`` in format version 2 from now on; ``scale_hi`` fp32 [ceil(out/256), n_groups] is the
    scale-grid ceiling its fp16 scales were snapped to (8-bit scales), None for fp16 scales."""
    module.compact_storage = True  # type: ignore[assignment]
    module.scale_hi = None if scale_hi is None else scale_hi.detach().float().cpu()  # type: ignore[assignment]
    if not getattr(module, "_has_encode_hook", False):
        module.register_state_dict_post_hook(_encode_hook)
        module._has_encode_hook = True  # type: ignore[assignment]
    return module


def metadata_bytes(module: QuantLinear) -> int:
    """Bytes of everything the checkpoint stores for ``module`` except the bias (planes + encoded metadata)."""
    return sum(t.numel() * t.element_size() for k, t in module.state_dict().items() if k != "bias")


def module_spec(module: QuantLinear, dtypes: str) -> dict[str, Any]:
    """What the loader needs to rebuild ``module`` before its tensors load."""
    layout = _layout(module)
    storage = {"storage": layout.to_dict()} if layout is not None else {}
    return {
        "in_features": module.in_features,
        "out_features": module.out_features,
        "bits": module.bits,
        "group_size": module.group_size,
        "n_types": int(module.tables.shape[0]),
        "zeros": module.has_zeros,
        "bias": module.bias is not None,
        "dtypes": dtypes,
        **storage,
    }


def empty_quant_linear(spec: dict[str, Any], device: torch.device | str | None = None) -> QuantLinear:
    """An empty module of ``spec``; with a ``storage`` entry its metadata buffers are the disk tensors."""
    module = _empty_in_memory(spec, device)
    if "storage" in spec:
        layout = DiskLayout.from_dict(spec["storage"])
        for name in ("type_ids", "scales", "zeros", "tables"):
            module._buffers.pop(name, None)
        n_groups = -(-spec["in_features"] // spec["group_size"])
        shapes = disk_shapes(layout, spec["out_features"], n_groups, spec["n_types"], spec["bits"])
        for name, (shape, dtype) in shapes.items():
            module.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device))
    module.dtypes = spec["dtypes"]
    return module


def decode_loaded(module: QuantLinear, spec: dict[str, Any]) -> None:
    """After the disk tensors loaded: rebuild the in-memory buffers and keep storing the compact way."""
    if "storage" not in spec:
        return
    layout = DiskLayout.from_dict(spec["storage"])
    disk_names = [*DISK_ONLY, "type_ids", "scales", "zeros", "tables"]
    disk: dict[str, torch.Tensor] = {}
    for name in disk_names:
        tensor = module._buffers.pop(name, None)
        if tensor is not None:
            disk[name] = tensor
    n_groups = -(-module.in_features // module.group_size)
    decoded = decode_metadata(disk, layout, module.out_features, n_groups, spec["dtypes"])
    device = module.weight.device
    for name in ("type_ids", "scales", "tables", "zeros"):
        value = decoded[name]
        module.register_buffer(name, None if value is None else value.to(device))
    use_compact_storage(module, decoded["scale_hi"])


def _empty_in_memory(spec: dict[str, Any], device: torch.device | str | None) -> QuantLinear:
    return QuantLinear.empty(
        spec["in_features"],
        spec["out_features"],
        spec["bits"],
        spec["group_size"],
        spec["n_types"],
        spec["zeros"],
        bias_dtype=torch.float32 if spec["bias"] else None,
        device=device,
    )


def replace_with_quant_linears(model: nn.Module, modules: dict[str, dict[str, Any]]) -> None:
    """Swap every module named in ``modules`` for an empty QuantLinear of its spec (on the module's device)."""
    for name, spec in modules.items():
        old = model.get_submodule(name)
        weight = getattr(old, "weight", None)
        device = weight.device if isinstance(weight, torch.Tensor) else None
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, empty_quant_linear(spec, device))


class SecateursQuantConfig(QuantizationConfigMixin):
    """Per-module packed-format specs of a Secateurs-quantized checkpoint."""

    def __init__(
        self, modules: dict[str, dict[str, Any]] | None = None, format_version: int = FORMAT_VERSION, **kwargs: Any
    ):
        if format_version > FORMAT_VERSION:
            raise InputError(
                f"quantization_config.format_version: {format_version} is newer than this Secateurs reads "
                f"({FORMAT_VERSION}); upgrade secateurs"
            )
        self.quant_method = QUANT_METHOD  # type: ignore[assignment]  # ours is not in transformers' enum
        self.modules = dict(modules or {})
        self.format_version = format_version

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "format_version": self.format_version, "modules": self.modules}


class SecateursHfQuantizer(HfQuantizer):
    """Loads pre-quantized Secateurs checkpoints (quantizing on load is not supported: use a recipe)."""

    requires_calibration = True
    quantization_config: SecateursQuantConfig

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        replace_with_quant_linears(model, self.quantization_config.modules)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        for name, spec in self.quantization_config.modules.items():
            module = model.get_submodule(name)
            assert isinstance(module, QuantLinear)
            decode_loaded(module, spec)

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register the config and quantizer with transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(SecateursQuantConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(SecateursHfQuantizer)


register()
