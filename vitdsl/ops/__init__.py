"""Built-in op kinds.  Importing this package registers them."""
from . import layer_scale, layout, shortcut  # noqa: F401
from . import attention, embed, io, join, merge, mlp, norm, scalar, transformer  # noqa: F401
from . import conv, mobilevit  # noqa: F401
from . import vitae  # noqa: F401
from .base import REGISTRY, Attrs, OpDef, SubNode, get_op, register_op

__all__ = ["REGISTRY", "Attrs", "OpDef", "SubNode", "get_op", "register_op"]
