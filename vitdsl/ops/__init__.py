"""Built-in op kinds.  Importing this package registers them."""
from . import attention, embed, io, join, mlp, norm, transformer  # noqa: F401
from .base import REGISTRY, Attrs, OpDef, SubNode, get_op, register_op

__all__ = ["REGISTRY", "Attrs", "OpDef", "SubNode", "get_op", "register_op"]
