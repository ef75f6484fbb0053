"""`vitdsl import timm:NAME`: write a spec (and optionally converted weights) for a timm
model of the ViT/DeiT, Swin or MobileViT families, by reading the instantiated model.

Any model of those classes works, not a list of names: the spec comes from the
modules' own sizes.  A feature vitdsl cannot express yet (register tokens, RoPE,
QuickGELU, a distillation head, ...) is reported by name instead of being guessed.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from ..errors import SpecError


class Unsupported(SpecError):
    pass


def _need(cond: bool, what: str, name: str) -> None:
    if not cond:
        raise Unsupported(f"timm model '{name}' uses {what}, which vitdsl cannot express yet")


def _eps(m) -> str:
    return f"{m.eps:g}"


def _act(m: nn.Module, name: str) -> str:
    cls = type(m).__name__
    if cls == "GELU":
        return "gelu" if m.approximate == "none" else "gelu_tanh"
    table = {"SiLU": "silu", "ReLU": "relu", "Identity": "none"}
    _need(cls in table, f"the activation {cls}", name)
    return table[cls]


def _is(m, *names) -> bool:
    return type(m).__name__ in names


def _same_blocks(cfgs: list[str]) -> list[tuple[str, int]]:
    """Run-length groups of identical block lines."""
    runs: list[tuple[str, int]] = []
    for c in cfgs:
        if runs and runs[-1][0] == c:
            runs[-1] = (c, runs[-1][1] + 1)
        else:
            runs.append((c, 1))
    return runs


# ------------------------------------------------------------------ ViT / DeiT
def _vit(model, name: str) -> list[str]:
    _need(type(model).__name__ == "VisionTransformer", f"the class {type(model).__name__}", name)
    _need(getattr(model, "num_reg_tokens", 0) == 0, "register tokens", name)
    _need(model.global_pool in ("token", "avg"), f"global_pool='{model.global_pool}'", name)
    _need(not getattr(model, "dynamic_img_size", False), "dynamic image sizes", name)
    _need(getattr(model, "attn_pool", None) is None, "attention pooling", name)
    pe = model.patch_embed
    _need(_is(pe, "PatchEmbed"), f"the patch embedding {type(pe).__name__}", name)
    conv = pe.proj
    _need(conv.kernel_size == conv.stride and conv.kernel_size[0] == conv.kernel_size[1] and conv.padding == (0, 0),
          "a non-square or overlapping patch embedding", name)
    h, w = pe.img_size
    lines = [f"input image {conv.in_channels}x{h}x{w}"]
    emb = f"embed patch size={conv.kernel_size[0]} dim={conv.out_channels}"
    if _is(pe.norm, "LayerNorm"):
        emb += f" norm=layernorm eps={_eps(pe.norm)}"
    else:
        _need(_is(pe.norm, "Identity"), f"a {type(pe.norm).__name__} patch norm", name)
    if conv.bias is None:
        emb += " bias=false"
    lines.append(emb)
    cls = model.cls_token is not None
    dist = getattr(model, "dist_token", None) is not None
    _need(not dist, "a distillation token", name)
    pos = model.pos_embed is not None
    tok = f"tokens cls={int(cls)} pos={'learned' if pos else 'none'}"
    if pos and model.no_embed_class and cls:
        tok += " pos_prefix=false"
    lines.append(tok)
    if _is(model.norm_pre, "LayerNorm"):
        lines.append(f"norm_pre: norm layernorm eps={_eps(model.norm_pre)}")
    else:
        _need(_is(model.norm_pre, "Identity"), "a pre-norm other than LayerNorm", name)
    blocks = []
    for b in model.blocks:
        _need(_is(b, "Block"), f"the block type {type(b).__name__}", name)
        a = b.attn
        _need(_is(a, "Attention") and _is(a.q_norm, "Identity") and _is(a.k_norm, "Identity"), "q/k normalisation or a custom attention", name)
        _need(_is(getattr(a, "norm", nn.Identity()), "Identity"), "a norm inside attention", name)
        _need(_is(b.norm1, "LayerNorm") and _is(b.norm2, "LayerNorm"), "block norms other than LayerNorm", name)
        _need(b.norm1.eps == b.norm2.eps, "different eps in one block", name)
        mlp = b.mlp
        _need(_is(mlp, "Mlp") and _is(mlp.norm, "Identity"), f"the MLP {type(mlp).__name__}", name)
        dim = a.qkv.in_features
        ratio = mlp.fc1.out_features / dim
        _need(int(dim * ratio) == mlp.fc1.out_features, "an MLP width vitdsl cannot express as a ratio", name)
        _need(a.proj.bias is not None and mlp.fc1.bias is not None, "bias-free projections", name)
        line = f"transformer heads={a.num_heads} mlp={ratio!r} act={_act(mlp.act, name)}"
        if a.qkv.bias is not None:
            line += " qkv_bias"
        line += f" eps={_eps(b.norm1)}"
        ls1, ls2 = b.ls1, b.ls2
        if _is(ls1, "LayerScale"):
            line += f" ls={float(ls1.gamma.detach().flatten()[0]):g}"
        else:
            _need(_is(ls1, "Identity") and _is(ls2, "Identity"), "a custom layer scale", name)
        blocks.append(line)
    runs = _same_blocks(blocks)
    _need(len(runs) == 1, "blocks that differ from each other", name)
    lines += [f"stage blocks depth={runs[0][1]} {{", f"  {runs[0][0]}", "}"]
    if _is(model.norm, "LayerNorm"):
        lines.append(f"norm layernorm eps={_eps(model.norm)}")
    classes = model.head.out_features if isinstance(model.head, nn.Linear) else 0
    _need(classes > 0, "a headless model (num_classes=0)", name)
    if model.global_pool == "avg" and _is(model.fc_norm, "LayerNorm"):
        lines += ["pool mean", f"fc_norm: norm layernorm eps={_eps(model.fc_norm)}", f"head classes={classes}"]
    else:
        pool = "cls" if model.global_pool == "token" else "mean"
        lines.append(f"head pool={pool} classes={classes}")
    return lines


# ------------------------------------------------------------------ Swin
def _swin(model, name: str) -> list[str]:
    _need(type(model).__name__ == "SwinTransformer", f"the class {type(model).__name__}", name)
    pe = model.patch_embed
    conv = pe.proj
    h, w = pe.img_size
    lines = [f"input image {conv.in_channels}x{h}x{w}"]
    emb = f"embed patch size={conv.kernel_size[0]} dim={conv.out_channels}"
    if _is(pe.norm, "LayerNorm"):
        emb += f" norm=layernorm eps={_eps(pe.norm)}"
    lines.append(emb)
    for i, layer in enumerate(model.layers):
        head = f"stage s{i + 1} depth={len(layer.blocks)}"
        if _is(layer.downsample, "PatchMerging"):
            d = layer.downsample
            head += " downsample=merge"
            if d.reduction.out_features != 2 * d.reduction.in_features // 4:
                head += f" dim={d.reduction.out_features}"
        else:
            _need(_is(layer.downsample, "Identity"), f"the downsample {type(layer.downsample).__name__}", name)
        b0 = layer.blocks[0]
        win = max(getattr(b0, "target_window_size", b0.window_size) if hasattr(b0, "target_window_size") else b0.window_size)
        target = getattr(model, "window_size", None)
        shift = "alternate" if any(getattr(layer.blocks[min(1, len(layer.blocks) - 1)], "target_shift_size", (0, 0))) else "none"
        _need(not getattr(b0, "always_partition", False), "always_partition", name)
        attn = b0.attn
        mlp = b0.mlp
        dim = attn.qkv.in_features
        ratio = mlp.fc1.out_features / dim
        size = win if target is None else (target[0] if isinstance(target, tuple) else target)
        line = (f"transformer heads={attn.num_heads} attn=window({size}, shift={shift}) mlp={ratio!r} "
                f"act={_act(mlp.act, name)}{' qkv_bias' if attn.qkv.bias is not None else ''} eps={_eps(b0.norm1)}")
        lines += [head + " {", f"  {line}", "}"]
    lines.append(f"norm layernorm eps={_eps(model.norm)}")
    lines.append(f"head pool=mean classes={model.head.fc.out_features}")
    return lines


# ------------------------------------------------------------------ MobileViT
def _conv_line(cna, name: str, label: str | None = None) -> str:
    c = cna.conv
    _need(c.stride[0] == c.stride[1] and c.kernel_size[0] == c.kernel_size[1], "non-square convolutions", name)
    act = _act(cna.bn.act, name) if hasattr(cna.bn, "act") else "none"
    line = f"conv out={c.out_channels} kernel={c.kernel_size[0]} stride={c.stride[0]} act={act}"
    if c.groups != 1:
        line += f" groups={c.groups}"
    return f"{label}: {line}" if label else line


def _mobilevit(model, name: str) -> list[str]:
    _need(type(model).__name__ == "ByobNet", f"the class {type(model).__name__}", name)
    stem = model.stem
    conv = stem.conv.conv if hasattr(stem, "conv") and hasattr(stem.conv, "conv") else stem.conv
    size = model.pretrained_cfg.get("input_size", (3, 256, 256))
    lines = [f"input image {size[0]}x{size[1]}x{size[2]}",
             _conv_line(stem if hasattr(stem, "bn") else stem.conv, name, "stem")]
    for i, stage in enumerate(model.stages):
        lines.append(f"stage s{i} depth=1 {{")
        for b in stage:
            if _is(b, "BottleneckBlock"):
                mid, cin = b.conv1_1x1.conv.out_channels, b.conv1_1x1.conv.in_channels
                k = b.conv2_kxk.conv
                line = f"mv2 out={b.conv3_1x1.conv.out_channels} stride={k.stride[0]} expand={mid / cin!r} kernel={k.kernel_size[0]}"
                line += f" act={_act(b.conv1_1x1.bn.act, name)}"
                lines.append("  " + line)
            elif _is(b, "MobileVitBlock"):
                t0 = b.transformer[0]
                dim = t0.attn.qkv.in_features
                line = (f"mobilevit dim={dim} depth={len(b.transformer)} heads={t0.attn.num_heads} "
                        f"mlp={t0.mlp.fc1.out_features / dim!r} patch={b.patch_size[0]} kernel={b.conv_kxk.conv.kernel_size[0]}"
                        f" act={_act(b.conv_kxk.bn.act, name)} eps={_eps(b.norm)}")
                if t0.attn.qkv.bias is not None:
                    line += " qkv_bias"
                lines.append("  " + line)
            else:
                _need(False, f"the block type {type(b).__name__}", name)
        lines.append("}")
    if not _is(model.final_conv, "Identity"):
        lines.append(_conv_line(model.final_conv, name, "final_conv"))
    lines.append(f"head pool=mean classes={model.head.fc.out_features}")
    return lines


FAMILIES: dict[str, Callable] = {"VisionTransformer": _vit, "SwinTransformer": _swin, "ByobNet": _mobilevit}


def spec_from_timm(name: str, model=None) -> tuple[str, object]:
    """(spec text, timm model) for a timm model name; raises Unsupported with a reason."""
    try:
        import timm
    except ImportError:
        raise SpecError("`vitdsl import timm:...` needs timm: pip install timm torchvision") from None
    if model is None:
        if name not in timm.list_models():
            from ..errors import did_you_mean

            raise SpecError(f"timm has no model '{name}'{did_you_mean(name, set(timm.list_models()))}")
        model = timm.create_model(name, pretrained=False)
    fam = FAMILIES.get(type(model).__name__)
    if fam is None:
        raise Unsupported(f"timm model '{name}' is a {type(model).__name__}; vitdsl imports the ViT/DeiT "
                          f"(VisionTransformer), Swin (SwinTransformer) and MobileViT (ByobNet with MobileViT blocks) families")
    if fam is _mobilevit and not any(_is(b, "MobileVitBlock") for s in model.stages for b in s):
        raise Unsupported(f"timm model '{name}' is a ByobNet without MobileViT blocks; only MobileViT ByobNets are imported")
    body = fam(model, name)
    safe = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in name)
    text = f"# imported from timm '{name}' by `vitdsl import`\nmodel {safe} {{\n" + "".join(f"  {ln}\n" for ln in body) + "}\n"
    from ..fmt import format_text

    return format_text(text), model
