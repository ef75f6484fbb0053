"""Per-layer bit widths (the `bits` section) and, later, fake quantization and calibration."""
from .bits import BitSpec, assign_bits, quant_layers

__all__ = ["BitSpec", "assign_bits", "quant_layers"]
