"""Bit-plane weight format: pure-torch reference (the oracle) and the ``torch.ops.secateurs`` ops.

Importing this package registers ``torch.ops.secateurs.dequantize`` / ``quant_matmul`` (CUDA kernels when
the extension is built, the reference otherwise). ``cuda_ext`` imports nothing else of Secateurs.
"""

from cuda_ext.ops import backend, dequantize, quant_matmul
from cuda_ext.reference import dequantize_codes, n_words, pack_bitplanes, unpack_bitplanes

__all__ = [
    "backend",
    "dequantize",
    "dequantize_codes",
    "n_words",
    "pack_bitplanes",
    "quant_matmul",
    "unpack_bitplanes",
]
