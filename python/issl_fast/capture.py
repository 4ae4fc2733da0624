"""Gradient capture: which parameters are tracked, and the per-example factors ``A`` (layer inputs)
and ``D`` (gradients w.r.t. layer outputs) collected by hooks during one backward pass.

A tracked ``nn.Linear`` / ``nn.Conv2d`` (groups = 1) contributes the weight gradient
``G_b = sum_t D_b[t]^T A_b[t]``: Linear rows over every leading position, Conv2d through
``unfold`` (T = output positions). The bias is an extra input column of ones, so the layer's flat
gradient is ``[W | b]`` row-major: index ``o * (d_in + 1) + i`` (``d_in`` = the bias column).
All inputs of an example (its clean anchor and views, and repeated calls of a shared module) are
concatenated along T, so one fused sketch call yields the example's whole layer gradient.

Any other trainable parameter the user asks for (LayerNorm, embeddings, grouped convs...) is a
*fallback* parameter: its per-example gradient comes from ``torch.func`` and is sketched densely
with its column offset. The flat gradient is the tracked layers in module order, then the
fallback parameters in ``named_parameters`` order.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Layer:
    """A tracked Linear / Conv2d and its place in the flat per-example gradient."""

    name: str
    module: nn.Module
    kind: str  # "linear" | "conv2d"
    d_in: int  # input features (+1 for the bias column)
    d_out: int
    has_bias: bool
    offset: int = 0

    @property
    def numel(self) -> int:
        return self.d_in * self.d_out

    def describe(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "d_in": self.d_in,
            "d_out": self.d_out,
            "bias": self.has_bias,
            "offset": self.offset,
        }


@dataclass
class FallbackParam:
    name: str
    param: nn.Parameter
    offset: int = 0

    @property
    def numel(self) -> int:
        return self.param.numel()


@dataclass
class ParamLayout:
    """The tracked parameters of a model and the layout of its flat per-example gradient."""

    layers: list[Layer]
    fallback: list[FallbackParam]
    total: int = field(init=False)

    def __post_init__(self) -> None:
        off = 0
        for layer in self.layers:
            layer.offset = off
            off += layer.numel
        for fb in self.fallback:
            fb.offset = off
            off += fb.numel
        self.total = off

    @property
    def fallback_numel(self) -> int:
        return sum(fb.numel for fb in self.fallback)

    def describe(self) -> dict:
        return {
            "layers": [layer.describe() for layer in self.layers],
            "fallback": [[fb.name, list(fb.param.shape)] for fb in self.fallback],
            "total": self.total,
        }


def _fusable(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros":
        return "conv2d"
    return None


def build_layout(model: nn.Module, track: Iterable[str] | None = None) -> ParamLayout:
    """Tracked parameters of ``model``.

    ``track=None``: every trainable Linear and Conv2d (weight and bias). Otherwise an iterable of
    module names (fused if Linear/Conv2d, else all their trainable parameters fall back to
    torch.func) and/or parameter names (always fallback).
    """
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    layers: list[Layer] = []
    fallback: list[FallbackParam] = []

    def add_module(name: str, mod: nn.Module) -> None:
        kind = _fusable(mod)
        if (
            kind is not None
            and mod.weight.requires_grad
            and (mod.bias is None or mod.bias.requires_grad)
        ):
            w = mod.weight
            d_in = w[0].numel() + (1 if mod.bias is not None else 0)
            layers.append(Layer(name, mod, kind, d_in, w.shape[0], mod.bias is not None))
        else:
            for pname, p in mod.named_parameters(recurse=False):
                if p.requires_grad:
                    full = f"{name}.{pname}" if name else pname
                    fallback.append(FallbackParam(full, p))

    if track is None:
        for name, mod in model.named_modules():
            if _fusable(mod) is not None and mod.weight.requires_grad:
                add_module(name, mod)
    else:
        wanted = list(track)
        for name in wanted:
            if name in modules:
                add_module(name, modules[name])
            elif name in params:
                if params[name].requires_grad:
                    fallback.append(FallbackParam(name, params[name]))
            else:
                raise ValueError(
                    f"track: {name!r} is neither a module nor a parameter of the model"
                )
        order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
        fallback.sort(key=lambda fb: order[fb.name])
    if not layers and not fallback:
        raise ValueError(
            "no trainable parameters are tracked (the model has no trainable "
            "Linear/Conv2d and track= named none)"
        )
    return ParamLayout(layers, fallback)


class FactorCapture:
    """Context manager that records every tracked layer's inputs and outputs on the forward pass;
    :meth:`backward` then asks autograd for the gradients w.r.t. those outputs only (no weight
    gradient is computed and no ``.grad`` is touched).

    The forward runs on ``groups * B`` rows (group-major: row ``g * B + b``); :meth:`factors`
    returns per-example ``A [B, groups*T, d_in]`` and ``D [B, groups*T, d_out]`` for a layer.
    """

    def __init__(self, layout: ParamLayout) -> None:
        self.layout = layout
        self._inputs: dict[str, list[torch.Tensor]] = {}
        self._outputs: dict[str, list[torch.Tensor]] = {}
        self._grads: dict[str, list[torch.Tensor]] = {}
        self._handles: list = []

    def __enter__(self) -> FactorCapture:
        for layer in self.layout.layers:
            self._handles.append(layer.module.register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, layer: Layer):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if torch.is_grad_enabled() and output.requires_grad:
                self._inputs.setdefault(layer.name, []).append(inputs[0].detach())
                self._outputs.setdefault(layer.name, []).append(output)

        return hook

    def backward(self, total: torch.Tensor) -> None:
        """Gradients of the scalar ``total`` w.r.t. every recorded layer output. An output the
        loss does not depend on (e.g. a head after the chosen representation) gets zeros."""
        names = [n for n in self._outputs for _ in self._outputs[n]]
        outs = [o for n in self._outputs for o in self._outputs[n]]
        grads = torch.autograd.grad(total, outs, allow_unused=True) if outs else ()
        self._grads = {}
        for name, out, g in zip(names, outs, grads):
            self._grads.setdefault(name, []).append(torch.zeros_like(out) if g is None else g)
        self._outputs.clear()  # release the graph

    def factors(self, layer: Layer, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example ``(A, D)`` of a layer: ``[B, groups*T, d_in]``, ``[B, groups*T, d_out]``."""
        xs, gs = self._inputs.get(layer.name, []), self._grads.get(layer.name, [])
        if not xs or len(gs) != len(xs):
            raise RuntimeError(
                f"layer {layer.name!r} was not called in the forward pass: is it part of the "
                "encoder whose output the loss uses?"
            )
        As, Ds = [], []
        for x, g in zip(xs, gs):
            a, d = self._rows(layer, x, g)
            As.append(_per_example(a, groups))
            Ds.append(_per_example(d, groups))
        return torch.cat(As, dim=1), torch.cat(Ds, dim=1)

    @staticmethod
    def _rows(layer: Layer, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer input/grad as ``[N, T, d_in]`` / ``[N, T, d_out]`` (bias column appended)."""
        mod = layer.module
        if layer.kind == "linear":
            a = x.reshape(x.shape[0], -1, x.shape[-1])
            d = g.reshape(g.shape[0], -1, g.shape[-1])
        else:
            a = F.unfold(
                x, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride
            ).transpose(1, 2)  # [N, L, C_in*kh*kw]
            d = g.flatten(2).transpose(1, 2)  # [N, L, C_out]
        if layer.has_bias:
            a = torch.cat([a, a.new_ones(a.shape[0], a.shape[1], 1)], dim=2)
        return a, d


def _im2col(x: torch.Tensor, mod: nn.Conv2d) -> torch.Tensor:
    """Conv2d patches ``[N, L, C_in*kh*kw]`` in the weight's (C_in, kh, kw) order. A strided view
    (2-3x faster than F.unfold on CPU); dilated convs use F.unfold."""
    (kh, kw), (sh, sw), (ph, pw) = mod.kernel_size, mod.stride, mod.padding
    if mod.dilation != (1, 1) or isinstance(mod.padding, str):
        return F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=mod.padding,
                        stride=mod.stride).transpose(1, 2)
    xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    patches = xp.unfold(2, kh, sh).unfold(3, kw, sw)  # [N, C, Ho, Wo, kh, kw]
    n, c = x.shape[:2]
    return patches.permute(0, 2, 3, 1, 4, 5).reshape(n, -1, c * kh * kw)


def _per_example(rows: torch.Tensor, groups: int) -> torch.Tensor:
    """``[groups*B, T, d]`` (group-major) -> ``[B, groups*T, d]``."""
    n, t, d = rows.shape
    b = n // groups
    return rows.reshape(groups, b, t, d).transpose(0, 1).reshape(b, groups * t, d).contiguous()


def fallback_grads(
    model: nn.Module, layout: ParamLayout, per_example_loss, inputs: torch.Tensor, groups: int
) -> torch.Tensor:
    """Per-example gradients ``[B, fallback_numel]`` of the fallback parameters, by torch.func.

    ``inputs`` are the encoder inputs (group-major ``[groups*B, ...]``); ``per_example_loss(out,
    batch)`` maps the encoder output to per-example losses.
    """
    from torch.func import functional_call, grad, vmap

    params = {fb.name: fb.param.detach() for fb in layout.fallback}
    b = inputs.shape[0] // groups
    per_ex = inputs.reshape(groups, b, *inputs.shape[1:]).transpose(0, 1)  # [B, groups, ...]

    def loss_one(p: dict, x: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, p, (x,))
        return per_example_loss(out, 1).sum()

    grads = vmap(grad(loss_one), in_dims=(None, 0))(params, per_ex)
    return torch.cat([grads[fb.name].reshape(b, -1) for fb in layout.fallback], dim=1)
