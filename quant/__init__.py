"""Mixed-datatype weight quantization (BitMoD and baselines) with packed bit-plane checkpoints.

Importing the package registers the ``secateurs_bitmod`` quantization method with transformers, so that
``AutoModelForCausalLM.from_pretrained`` rebuilds packed layers.
"""

from quant import hf as _hf  # noqa: F401  (registration side effect)
