"""Int8 per target: PT2E QAT and PTQ behind one interface, plus coherence-keeping fine-tuning.

``prepare(model, target, example) -> QuantModel`` (fake quant), the shared trainer fine-tunes it,
``convert`` gives the int8 graph that ``edgepc.export`` writes for each runtime.
"""

from edgepc.quant.model import MAX_BATCH, QuantModel, convert, prepare, quantized, restore
from edgepc.quant.plan import PrecisionPlan
from edgepc.quant.recipes import Recipe, quantizer

__all__ = [
    "MAX_BATCH",
    "PrecisionPlan",
    "QuantModel",
    "Recipe",
    "convert",
    "prepare",
    "quantized",
    "quantizer",
    "restore",
]
