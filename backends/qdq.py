"""The deploy form of a quantized model: fake quantizers rewritten as TensorRT's INT8
quantize-dequantize, shared by the ONNX and TensorRT backends.

TensorRT (and ONNX's QuantizeLinear/DequantizeLinear) know one integer grid for
activations: signed INT8, zero point 0, saturating at [-128, 127].  The torch backend's
fake quantizers (vitdsl.quant.fake) use other grids too; each is rewritten into INT8
Q/DQ plus plain float ops so that the deploy form computes what the torch backend
computes:

  signed b-bit input            clip to +-(2^(b-1)-1) steps, then INT8 Q/DQ (exact; at
                                b = 8 the clip only keeps -128 off the narrow grid)
  weights (any width)           rounded to their grid in the torch model, then a Q/DQ
                                whose Q folds into an INT8/INT4 constant (exact)
  unsigned 8-bit softmax output A = P + 128 s with P on the INT8 grid, so
                                A V = P V + 128 s (sum over tokens of V): an INT8 product
                                plus a float correction (exact)
  unsigned b-bit, b < 8         clip to (2^b-1) steps, INT8 Q/DQ (exact)
  twin range (MPTQ, post-GELU)  two Q/DQ branches, min(x,0) on the negative step and
                                max(x,0) on the positive one, added (exact); the layer
                                after it then has a float input

Every Q/DQ is one call of the custom op ``vitdsl::qdq`` (name = the quantizer's module
path), so torch.export keeps it whole for torch-tensorrt and the ONNX exporter turns it
into a QuantizeLinear/DequantizeLinear pair.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from vitdsl.quant.fake import AttnQuant, FakeQuant, QuantConv2d, QuantLinear

INT8_MIN, INT8_MAX = -128, 127


@torch.library.custom_op("vitdsl::qdq", mutates_args=())
def qdq(x: torch.Tensor, scale: torch.Tensor, axis: int, name: str) -> torch.Tensor:
    """INT8 quantize-dequantize with zero point 0: clamp(round(x / s), -128, 127) * s,
    per tensor (scale of one element) or per slice along `axis`."""
    s = scale if scale.numel() == 1 else scale.view(-1, *([1] * (x.dim() - 1 - axis)))
    return torch.clamp(torch.round(x / s.to(x.dtype)), INT8_MIN, INT8_MAX) * s.to(x.dtype)


@qdq.register_fake
def _qdq_fake(x, scale, axis, name):
    return torch.empty_like(x)


@torch.library.custom_op("vitdsl::tag", mutates_args=())
def tag(x: torch.Tensor, name: str) -> torch.Tensor:
    """Identity that names the linear/conv layer reading `x` (ONNX export only; removed there)."""
    return x.clone()


@tag.register_fake
def _tag_fake(x, name):
    return torch.empty_like(x)


@dataclass
class Quantizer:
    """One quantizer of the deploy form, as the backends describe it."""

    name: str  # module path of the torch backend's quantizer
    role: str  # weight | input | q | k | v | probs
    bits: int
    signed: bool
    twin: bool = False
    runs_as: str = "INT8"
    notes: list[str] = field(default_factory=list)


class QDQ(nn.Module):
    """An INT8 Q/DQ standing for one fake quantizer: clip to the b-bit grid when it is
    narrower than INT8, then ``vitdsl::qdq``."""

    def __init__(self, fq: FakeQuant, name: str, axis: int = 0, clip: bool = True):
        super().__init__()
        self.name, self.axis = name, axis
        self.register_buffer("scale", fq.scale.detach().clone())
        self.lo, self.hi = fq.qmin, fq.qmax
        # Clip unless INT8's saturation is the grid's edge: [-128, 127], or a non-negative
        # input (softmax) on [0, 127].  The narrow signed 8-bit grid [-127, 127] is clipped
        # too, so that -128 never appears where the torch backend has -127.
        self.clip = clip and (self.lo, self.hi) not in ((-128, 127), (0, 127))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.clip:
            s = self.scale.to(x.dtype)
            x = torch.clamp(x, self.lo * s, self.hi * s) if self.lo < 0 else torch.clamp(x, 0 * s, self.hi * s)
        return torch.ops.vitdsl.qdq(x, self.scale, self.axis, self.name)


class TwinQDQ(nn.Module):
    """MPTQ's twin-range quantizer as two INT8 Q/DQ branches: negatives on step
    neg_scale over [-2^(b-1), 0], positives on step scale over [0, 2^(b-1)-1]."""

    def __init__(self, fq: FakeQuant, name: str):
        super().__init__()
        self.name, self.bits = name, fq.bits
        self.register_buffer("pos_scale", fq.scale.detach().clone())
        self.register_buffer("neg_scale", fq.neg_scale.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = 2 ** (self.bits - 1)
        neg, pos = torch.clamp(x, max=0.0), torch.clamp(x, min=0.0)
        if self.bits < 8:
            neg = torch.clamp(neg, min=-half * self.neg_scale.to(x.dtype))
            pos = torch.clamp(pos, max=(half - 1) * self.pos_scale.to(x.dtype))
        return (torch.ops.vitdsl.qdq(neg, self.neg_scale, 0, self.name + ".neg")
                + torch.ops.vitdsl.qdq(pos, self.pos_scale, 0, self.name + ".pos"))


class DeployAttnQuant(nn.Module):
    """AttnQuant with INT8 Q/DQ: QKᵀ and A·V read Q/DQ outputs on both sides.  An
    unsigned 8-bit A is shifted by 128 steps onto INT8 and the shift added back after
    the product (128 s times the sum of V over tokens)."""

    def __init__(self, aq: AttnQuant, name: str):
        super().__init__()
        self.q, self.k, self.v = (QDQ(getattr(aq, r), f"{name}.{r}") for r in ("q", "k", "v"))
        self.shift = aq.probs.qmax > INT8_MAX  # [0, 255] does not fit INT8; [0, 2^b-1] for b < 8 does
        # The shifted tensor is A - 128 s, not A: its own name says so.
        self.probs = QDQ(aq.probs, f"{name}.probs" + (".shifted" if self.shift else ""))
        if self.shift:
            self.probs.clip = False
            self.offset = float(-(INT8_MIN))  # 128 steps

    def scores(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        return self.q(q * scale) @ self.k(k).transpose(-2, -1)

    def mix(self, probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        vq = self.v(v)
        if not self.shift:
            return self.probs(probs) @ vq
        off = self.offset * self.probs.scale.to(probs.dtype)
        return self.probs(probs - off) @ vq + off * vq.sum(dim=-2, keepdim=True)

    def forward(self, q, k, v, add: torch.Tensor | None, scale: float) -> torch.Tensor:
        s = self.scores(q, k, scale)
        if add is not None:
            s = s + add
        return self.mix(s.softmax(dim=-1), v)


def quantizers(model: nn.Module) -> list[Quantizer]:
    """Every fake quantizer of a torch-backend model, with what TensorRT runs it as."""
    out: list[Quantizer] = []
    for name, m in model.named_modules():
        if not isinstance(m, FakeQuant):
            continue
        leaf = name.rsplit(".", 1)[-1]
        role = {"weight_quant": "weight", "input_quant": "input"}.get(leaf, leaf)
        q = Quantizer(name=name, role=role, bits=m.bits, signed=m.signed, twin=m._twin)
        out.append(q)
    return out


def check_calibrated(model: nn.Module) -> None:
    """A deploy form needs every scale: refuse an uncalibrated model."""
    for name, m in model.named_modules():
        if isinstance(m, FakeQuant) and not m._ready:
            from vitdsl.errors import SpecError

            raise SpecError(f"quantizer '{name}' has no range: calibrate the model (vitdsl quantize) and build "
                            "with --weights OUT/model.safetensors")


def deploy_form(model: nn.Module, tags: bool = False) -> nn.Module:
    """A copy of `model` whose fake quantizers are INT8 Q/DQ (``vitdsl::qdq``).  With
    `tags`, every linear/conv input also passes through ``vitdsl::tag`` naming the layer
    (for the ONNX exporter, which otherwise loses the module path)."""
    check_calibrated(model)
    m = copy.deepcopy(model).eval()
    for name, mod in list(m.named_modules()):
        if isinstance(mod, (QuantLinear, QuantConv2d)):
            with torch.no_grad():  # weights onto their grid: the INT8/INT4 constant is then exact
                mod.weight.copy_(mod.weight_quant(mod.weight))
            fq_in = mod.input_quant
            mod.weight_quant = QDQ(mod.weight_quant, f"{name}.weight_quant", axis=0, clip=False)
            mod.input_quant = (TwinQDQ(fq_in, f"{name}.input_quant") if fq_in._twin
                               else QDQ(fq_in, f"{name}.input_quant"))
        elif isinstance(getattr(mod, "matmul_quant", None), AttnQuant):
            mod.matmul_quant = DeployAttnQuant(mod.matmul_quant, f"{name}.matmul_quant")
    if tags:
        for name, mod in m.named_modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d)):
                mod.register_forward_pre_hook(_tagger(name))
    return m


def _tagger(name: str):
    def hook(module, args):
        return (torch.ops.vitdsl.tag(args[0], name),) + tuple(args[1:])

    return hook
