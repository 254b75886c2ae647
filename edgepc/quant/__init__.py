"""Int8 per target: PT2E QAT and PTQ behind one interface, plus coherence-keeping fine-tuning.

``prepare(model, target, example) -> QuantModel`` (fake quant), the shared trainer fine-tunes it,
``convert`` gives the int8 graph that ``edgepc.export`` writes for each runtime.
"""

from edgepc.quant.model import MAX_BATCH, QuantModel, convert, prepare, quantized, restore
from edgepc.quant.recipes import SUPPORTED, Recipe, check_supported, quantizer

__all__ = [
    "MAX_BATCH",
    "SUPPORTED",
    "QuantModel",
    "Recipe",
    "check_supported",
    "convert",
    "prepare",
    "quantized",
    "quantizer",
    "restore",
]
