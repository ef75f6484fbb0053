"""vitdsl: a language and compiler for vision-transformer architectures.

    g = vitdsl.load("specs/vit_small_patch16_224.vit")   # parse + validate
    model = vitdsl.compile(g)                            # torch.nn.Module
"""
from .api import compile, load, loads, run_passes
from .builder import Builder
from .errors import InputError, SpecError
from .graph import Graph, Node
from .ops.base import Attrs, OpDef, register_op
from .syntax import parse
from .types import Cost, TensorType

__all__ = ["load", "loads", "compile", "run_passes", "Builder", "SpecError", "InputError", "Graph", "Node",
           "Attrs", "OpDef", "register_op", "parse", "Cost", "TensorType"]
__version__ = "0.1.0"
