"""Per-layer bit widths (the `bits` section), fake quantization and calibration."""
from .bits import BitSpec, assign_bits, quant_layers
from .calibrate import calibrate

__all__ = ["BitSpec", "assign_bits", "quant_layers", "calibrate"]
