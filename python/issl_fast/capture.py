"""Gradient capture: which parameters are tracked, and the per-example factors ``A`` (layer inputs)
and ``D`` (gradients w.r.t. layer outputs) collected by hooks during one backward pass.

A tracked ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` (groups = 1) contributes
the weight gradient ``G_b = sum_t D_b[t]^T A_b[t]``: Linear rows over every leading position,
convolutions through their patches (T = output positions: samples, pixels or voxels). The bias
is an extra input column of ones, so the layer's flat gradient is ``[W | b]`` row-major: index
``o * (d_in + 1) + i`` (``d_in`` = the bias column). All inputs of an example (its clean anchor
and views, and repeated calls of a shared module) are concatenated along T, so one fused sketch
call yields the example's whole layer gradient.

A grouped convolution (depthwise included) has a block-diagonal weight gradient, not one
``D^T A``: its exact per-example gradient ``[B, d_out, d_in]`` is formed from the same hooks
(:meth:`FactorCapture.grouped_grads`, one strided slice of the input per kernel tap, never an
unfolded copy) and sketched from there; it is small (the layer's own parameter count).

An ``nn.MultiheadAttention``'s projections are two Linear layers whose calls are recorded through
``F.linear`` (attention.py): module hooks cannot see them.

Any other trainable parameter the user asks for (LayerNorm, embeddings...) is a
*fallback* parameter: its per-example gradient comes from ``torch.func`` and is sketched densely
with its column offset. The flat gradient is the tracked layers in module order, then the
fallback parameters in ``named_parameters`` order.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Union, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from . import attention

# The convolutions fused like Linear layers, by their number of spatial dimensions; their kind
# in a layout is "conv1d" / "conv2d" / "conv3d".
Conv = Union[nn.Conv1d, nn.Conv2d, nn.Conv3d]
_CONV_MODULES: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_FUSED_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FUNCTIONS: dict[int, Callable[..., torch.Tensor]] = {1: F.conv1d, 2: F.conv2d,
                                                           3: F.conv3d}


def conv_function(mod: Conv) -> Callable[..., torch.Tensor]:
    """``F.conv1d`` / ``F.conv2d`` / ``F.conv3d``: the functional form of the module."""
    return _CONV_FUNCTIONS[len(mod.kernel_size)]


@dataclass
class Layer:
    """A tracked Linear / convolution and its place in the flat per-example gradient."""

    name: str
    module: nn.Module
    kind: str  # "linear" | "conv1d" | "conv2d" | "conv3d"
    d_in: int  # input features (+1 for the bias column); a grouped conv: one group's
    d_out: int
    has_bias: bool
    offset: int = 0
    groups: int = 1  # a grouped convolution's groups (its gradient: FactorCapture.grouped_grads)
    # An attention projection (see attention.py): the nn.MultiheadAttention whose F.linear calls
    # are recorded, and the attribute of `module` holding the weight.
    owner: nn.MultiheadAttention | None = None
    weight_attr: str = "weight"
    # The model's names of the weight (and bias) this layer's flat gradient covers, in order.
    params: tuple[str, ...] = ()
    # A Linear inside a sequence-first torch transformer layer: its inputs are [T, N, d].
    seq_first: bool = False

    @property
    def numel(self) -> int:
        return self.d_in * self.d_out

    def describe(self) -> dict:
        out = {
            "name": self.name,
            "kind": self.kind,
            "d_in": self.d_in,
            "d_out": self.d_out,
            "bias": self.has_bias,
            "offset": self.offset,
        }
        if self.groups > 1:  # (only then: fingerprints of ungrouped layouts stay as they were)
            out["groups"] = self.groups
        return out


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


def _in_sequence_first_block(modules: dict[str, nn.Module], name: str) -> bool:
    """Whether the module is a Linear of torch's own sequence-first transformer layer: its input
    is then ``[T, N, d]`` by construction (elsewhere the shapes, or a probe, tell)."""
    parent = modules.get(name.rpartition(".")[0])
    return (isinstance(parent, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))
            and not parent.self_attn.batch_first)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _fusable(module: nn.Module) -> str | None:
    """The fused kind of a module, or None. Only modules whose output is torch's own function of
    their own ``weight`` / ``bias`` parameters: a subclass with its own forward (weight
    standardisation, padding inside forward) or a reparametrised weight (weight / spectral norm:
    the parameters are others) takes the torch.func fallback, which differentiates the real
    parameters."""
    if "weight" not in module._parameters or parametrize.is_parametrized(module):
        return None
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return "linear"
    for dims, cls in _CONV_MODULES.items():
        if (isinstance(module, cls) and type(module).forward is cls.forward
                and type(module)._conv_forward is cls._conv_forward):  # type: ignore[attr-defined]
            return f"conv{dims}d"
    return None


def build_layout(model: nn.Module, track: Iterable[str] | None = None) -> ParamLayout:
    """Tracked parameters of ``model``.

    ``track=None``: every trainable Linear and Conv1d/2d/3d (weight and bias; fused, grouped
    convolutions included), and each ``nn.MultiheadAttention``'s projections: fused as two Linear
    layers (``<name>.in_proj``, the packed q/k/v projection, and ``<name>.out_proj``) recorded
    through ``F.linear`` (attention.py), or for the forms that does not cover, all its parameters
    through the torch.func fallback. Otherwise an iterable of module names (fused if
    Linear/convolution/attention, else all their trainable parameters fall back to torch.func)
    and/or parameter names (always fallback).
    """
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    layers: list[Layer] = []
    fallback: list[FallbackParam] = []
    mhas = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    # out_proj Linears never run as modules: their attention module's F.linear calls are seen.
    owner_of = {id(m.out_proj): m for m in mhas}

    def add_linear(name: str, layer_name: str, mod: nn.Module, owner: nn.MultiheadAttention,
                   weight_attr: str = "weight", bias_attr: str = "bias") -> None:
        """An attention projection: module ``name``'s ``weight_attr`` / ``bias_attr``."""
        w, b = getattr(mod, weight_attr), getattr(mod, bias_attr)
        names = tuple(_join(name, a) for a, p in ((weight_attr, w), (bias_attr, b))
                      if p is not None)
        if w.requires_grad and (b is None or b.requires_grad):
            d_in = w.shape[1] + (1 if b is not None else 0)
            layers.append(Layer(layer_name, mod, "linear", d_in, w.shape[0], b is not None,
                                owner=owner, weight_attr=weight_attr, params=names))
        else:
            for full, p in zip(names, (p for p in (w, b) if p is not None)):
                if p.requires_grad:
                    fallback.append(FallbackParam(full, p))

    def add_module(name: str, mod: nn.Module) -> None:
        if isinstance(mod, nn.MultiheadAttention) and attention.fusable(mod):
            add_linear(name, _join(name, "in_proj"), mod, mod, "in_proj_weight", "in_proj_bias")
            add_linear(_join(name, "out_proj"), _join(name, "out_proj"), mod.out_proj, mod)
            return
        owner = owner_of.get(id(mod))
        if owner is not None:
            if attention.fusable(owner):
                add_linear(name, name, mod, owner)
            else:
                for pname, p in mod.named_parameters():
                    if p.requires_grad:
                        fallback.append(FallbackParam(f"{name}.{pname}", p))
            return
        kind = _fusable(mod)
        if (
            kind is not None
            and mod.weight.requires_grad
            and (mod.bias is None or mod.bias.requires_grad)
        ):
            w = cast(torch.Tensor, mod.weight)
            d_in = w[0].numel() + (1 if mod.bias is not None else 0)
            groups = int(getattr(mod, "groups", 1))
            names = (_join(name, "weight"),) + ((_join(name, "bias"),) if mod.bias is not None
                                                else ())
            seq_first = _in_sequence_first_block(modules, name)
            layers.append(Layer(name, mod, kind, d_in, w.shape[0], mod.bias is not None,
                                groups=groups, params=names, seq_first=seq_first))
        else:
            own = list(mod.named_parameters(recurse=False))
            if isinstance(mod, nn.MultiheadAttention):  # its out_proj runs through F.linear too
                own += [(f"out_proj.{n}", p) for n, p in mod.out_proj.named_parameters()]
            if parametrize.is_parametrized(mod):  # the real parameters of e.g. a weight norm
                own += [(f"parametrizations.{n}", p)
                        for n, p in cast(nn.Module, mod.parametrizations).named_parameters()]
            for pname, p in own:
                if p.requires_grad:
                    full = f"{name}.{pname}" if name else pname
                    fallback.append(FallbackParam(full, p))
            # A block or container named in track=: its submodules as the default takes them
            # (Linear/convolution/attention fused, the rest through torch.func).
            if not isinstance(mod, nn.MultiheadAttention) and not parametrize.is_parametrized(mod):
                for child, sub in mod.named_children():
                    add_module(_join(name, child), sub)

    if track is None:
        for name, mod in model.named_modules():
            if isinstance(mod, nn.MultiheadAttention):
                add_module(name, mod)  # its projections, out_proj included
            elif (isinstance(mod, _FUSED_TYPES) and id(mod) not in owner_of
                  and mod.weight.requires_grad):
                add_module(name, mod)  # fused
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
    # Each layer once (an attention module and its out_proj both named in track=); each fallback
    # parameter once (named twice, as a module's and by name, or tied to another name) and only
    # if no layer covers it, under the name and in the order named_parameters() gives it.
    firsts: dict[tuple[int, str], Layer] = {}
    for layer in layers:
        firsts.setdefault((id(layer.module), layer.weight_attr), layer)
    layers = _untie(model, list(firsts.values()), fallback)
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names):  # e.g. an attention subclass with a child named in_proj
        clash = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"two tracked layers are both named {clash}: rename the module or "
                         "choose the layers with track=")
    covered = {id(params[n]) for layer in layers for n in layer.params if n in params}
    canonical = {id(p): (i, n) for i, (n, p) in enumerate(model.named_parameters())}
    unique = {id(fb.param): fb.param for fb in fallback if id(fb.param) not in covered}
    fallback = [FallbackParam(canonical[k][1], p)
                for k, p in sorted(unique.items(), key=lambda kv: canonical[kv[0]][0])]
    if not layers and not fallback:
        raise ValueError(
            "no trainable parameters are tracked (the model has no trainable "
            "Linear/Conv1d/Conv2d/Conv3d and track= named none)"
        )
    return ParamLayout(layers, fallback)


def _untie(model: nn.Module, layers: list[Layer], fallback: list[FallbackParam]) -> list[Layer]:
    """``layers`` without those holding a parameter that another module uses too (tied
    weights: an encoder/decoder pair, an embedding tied to an output Linear): a layer's hooks
    see its own use only, and the parameter's gradient is the sum over every use. Their
    parameters join ``fallback`` instead (torch.func, on the tied model: exact)."""
    users: dict[int, set[int]] = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            users.setdefault(id(p), set()).add(id(mod))
    kept = []
    for layer in layers:
        params = [p for p in (getattr(layer.module, layer.weight_attr),
                              getattr(layer.module, "in_proj_bias" if layer.weight_attr
                                      == "in_proj_weight" else "bias", None)) if p is not None]
        if any(len(users.get(id(p), ())) > 1 for p in params):
            fallback.extend(FallbackParam(n, p) for n, p in zip(layer.params, params))
        else:
            kept.append(layer)
    return kept


# Maps a recorded output's gradient to the layer's D (attention projections: batch-first rows,
# zero-padded to the layer's width).
Post = Callable[[torch.Tensor], torch.Tensor]


class FactorCapture:
    """Context manager that records every tracked layer's inputs and outputs on the forward pass;
    :meth:`backward` then asks autograd for the gradients w.r.t. those outputs only (no weight
    gradient is computed and no ``.grad`` is touched).

    The forward runs on ``groups * B`` rows (group-major: row ``g * B + b``); :meth:`factors`
    returns per-example ``A [B, groups*T, d_in]`` and ``D [B, groups*T, d_out]`` for a layer.
    ``rows`` (``groups * B``, when known) and a probe (:meth:`unsettled`, :meth:`resolve`)
    locate the batch dimension of each Linear call's input: a sequence-first ``[T, rows, d]``
    input (torch's transformer layers by default) is turned batch-first. Hooks fire only for the
    thread that opened the capture.
    """

    def __init__(self, layout: ParamLayout, rows: int | None = None,
                 batch_axes: dict[str, list[int]] | None = None) -> None:
        self.layout = layout
        self.rows = rows
        # Which dimension of each hooked Linear call's input is the batch (0 or 1), per layer
        # and call, as a probe found it (see resolve()); kept across batches by the caller.
        self.batch_axes = batch_axes if batch_axes is not None else {}
        self._recording = True
        self._axes: dict[str, list[int | None]] = {}  # per recorded call; None = ambiguous
        self._kinds = {layer.name: layer.kind for layer in layout.layers}
        self._inputs: dict[str, list[torch.Tensor]] = {}
        # (output, how its gradient becomes the layer's D: None = as it is)
        self._outputs: dict[str, list[tuple[torch.Tensor, Post | None]]] = {}
        self._grads: dict[str, list[torch.Tensor]] = {}
        self._handles: list = []
        self._functional = attention.FunctionalLinear(self._record)

    def __enter__(self) -> FactorCapture:
        self._thread = threading.get_ident()
        try:
            for layer in self.layout.layers:
                if layer.owner is not None:  # an attention projection: its F.linear calls
                    which = "in" if layer.weight_attr == "in_proj_weight" else "out"
                    self._functional.track(layer.name, layer.owner, which, layer.d_out)
                else:
                    self._handles.append(layer.module.register_forward_hook(self._hook(layer)))
            self._functional.__enter__()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._functional.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _record(self, name: str, x: torch.Tensor, output: torch.Tensor,
                post: Post | None = None) -> None:
        self._inputs.setdefault(name, []).append(x)
        self._outputs.setdefault(name, []).append((output, post))

    def _hook(self, layer: Layer):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if threading.get_ident() != self._thread or not self._recording:
                # another thread featurising the same model with its own capture, or the
                # recomputation of an activation-checkpointed forward during backward()
                return
            if torch.is_grad_enabled() and output.requires_grad:
                x = inputs[0].detach()
                if layer.kind == "linear":
                    axis = self._batch_axis(layer, x)
                    self._axes.setdefault(layer.name, []).append(axis)
                else:
                    if x.dim() != len(cast(Conv, module).kernel_size) + 2:
                        # (a batch is [N, C, *spatial] by definition; torch also takes one
                        # example)
                        raise ValueError(
                            f"layer {layer.name!r} got an input of shape {tuple(x.shape)} "
                            f"without a batch dimension: a {type(module).__name__} input must "
                            "be batched, [N, C, *spatial]")
                    self._axes.setdefault(layer.name, []).append(self._conv_axis(layer, x))
                self._record(layer.name, x, output)

        return hook

    def _batch_axis(self, layer: Layer, x: torch.Tensor) -> int | None:
        """Which dimension of a Linear input is the batch: 0 (``[rows * k, ...]``, k >= 1 rows
        per example together, e.g. windows) or 1 (sequence-first ``[T, rows, ...]``). A probed
        answer for this call (``batch_axes``) is used while the shape still fits it; None: to be
        probed (:meth:`unsettled`), the shape alone cannot tell (a batch-first input can have as
        many tokens as rows, a table fed to the layer can have a multiple of rows). An input
        where neither dimension fits is an error."""
        call = len(self._axes.get(layer.name, []))
        known = self.batch_axes.get(layer.name, [])
        if self.rows is None:
            return 1 if layer.seq_first and x.dim() >= 3 else 0
        first = x.shape[0] % self.rows == 0
        second = x.dim() >= 3 and x.shape[1] == self.rows
        if call < len(known) and (first, second)[known[call]]:
            return known[call]
        if not (first or second):
            raise ValueError(
                f"layer {layer.name!r} got an input of shape {tuple(x.shape)}: neither its first "
                f"nor its second dimension is the batch ({self.rows} rows = views x examples), "
                "so its rows cannot be assigned to examples"
            )
        return None

    def _conv_axis(self, layer: Layer, x: torch.Tensor) -> int | None:
        """0 when a convolution's input rows can be assigned to examples, None when the probe
        must tell first: an input of ``rows * k`` rows (k frames of a clip folded into the
        batch) is an example's k rows together only if the probe finds them so (kept in
        ``batch_axes`` for later batches). Rows that are no multiple of the batch are an
        error."""
        if self.rows is None or x.shape[0] == self.rows:
            return 0
        if x.shape[0] % self.rows:
            raise ValueError(
                f"layer {layer.name!r} ran on {x.shape[0]} rows for a batch of {self.rows} "
                "(views x examples): a convolution's input rows must be the batch, or k rows "
                "per view of an example kept together (a clip's frames folded into the batch, "
                "[N * T, C, ...] from [N, T, C, ...]), so they cannot be assigned to examples. "
                "Track the layer by its parameters' names instead (track=['<layer>.weight', "
                "'<layer>.bias']: the torch.func path)")
        call = len(self._axes.get(layer.name, []))
        return 0 if call < len(self.batch_axes.get(layer.name, [])) else None

    def unsettled(self) -> bool:
        """Whether some recorded call's batch dimension (a Linear's), or the grouping of its
        rows by example (a convolution's), needs the probe
        (:func:`~issl_fast.featurize.probe_batch_axes`, then :meth:`resolve`)."""
        return any(None in axes for axes in self._axes.values())

    def probe_inputs(self) -> dict[str, list[torch.Tensor]]:
        """The input of every recorded call (detached) of the layers the probe looks at: every
        hooked Linear, and each convolution with a call still unsettled (several rows per
        example)."""
        return {name: list(self._inputs[name]) for name, axes in self._axes.items()
                if self._kinds[name] == "linear" or None in axes}

    def resolve(self, axes: dict[str, list[int]]) -> None:
        """Sets the batch dimension of every call of the probed layers (per layer, per call)
        and keeps them in ``batch_axes`` for later batches."""
        for name in axes:
            self._axes[name] = list(axes[name])
            self.batch_axes[name] = list(axes[name])

    def backward(self, total: torch.Tensor) -> None:
        """Gradients of the scalar ``total`` w.r.t. every recorded layer output. An output the
        loss does not depend on (e.g. a head after the chosen representation) gets zeros."""
        self._recording = self._functional.recording = False  # checkpoints recompute forwards
        calls = [(n, out, post) for n in self._outputs for out, post in self._outputs[n]]
        outs = [out for _, out, _ in calls]
        grads = torch.autograd.grad(total, outs, allow_unused=True) if outs else ()
        self._grads = {}
        for (name, out, post), g in zip(calls, grads):
            g = torch.zeros_like(out) if g is None else g
            self._grads.setdefault(name, []).append(g if post is None else post(g))
        self._outputs.clear()  # release the graph

    def calls(self, layer: Layer) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(input, output gradient)`` of each call of the layer in this pass."""
        xs, gs = self._inputs.get(layer.name, []), self._grads.get(layer.name, [])
        if not xs or len(gs) != len(xs):
            raise RuntimeError(
                f"layer {layer.name!r} was not called in the forward pass (or once for each of "
                "its recorded outputs): is it part of the encoder whose output the loss uses? A "
                "model that applies the module's weight with F.linear / F.conv2d instead of "
                "calling the module needs its parameters tracked by name (track=[...], the "
                "torch.func path)"
            )
        axes = self._axes.get(layer.name, [0] * len(xs))
        if None in axes:
            raise RuntimeError(f"layer {layer.name!r}: its batch dimension was never resolved")
        # sequence-first calls turned batch-first: [T, rows, ...] -> [rows, T, ...]
        return [(x.transpose(0, 1), g.transpose(0, 1)) if a == 1 else (x, g)
                for x, g, a in zip(xs, gs, axes)]

    def grouped_grads(self, layer: Layer, groups: int) -> torch.Tensor:
        """The exact per-example weight gradient ``[B, d_out, d_in]`` of a grouped convolution
        (bias column last, as in the flat layout), summed over the example's ``groups`` inputs
        and over calls; float32 (float64 for a float64 model).

        Weight tap ``j`` of output o and input channel c of its group is
        ``sum_l D[o, l] * x_pad[group(o) * cg + c, at l shifted by the tap]``: a correlation of
        the padded input with D, i.e. one grouped convolution with every (row, group) pair a
        group of its own, D as the filters, the layer's dilation as stride and its stride as
        dilation (no unfolded copy: a depthwise 7x7 layer would need 49 times its input)."""
        mod = cast(Conv, layer.module)
        taps, G = tuple(mod.kernel_size), layer.groups
        spatial = tuple(range(2, 2 + len(taps)))
        total: torch.Tensor | None = None
        for x, g in self.calls(layer):
            dtype = torch.promote_types(x.dtype, torch.float32)
            n = x.shape[0]  # rows: groups x examples x frames (several if folded into N)
            b = (self.rows if self.rows is not None else n) // groups
            cg, og = x.shape[1] // G, g.shape[1] // G
            xp = padded_input(mod, x.to(dtype))
            inp = xp.reshape(n * G, cg, *xp.shape[2:]).transpose(0, 1)  # [cg, n*G, *padded]
            filters = g.to(dtype).reshape(n * G * og, 1, *g.shape[2:])  # [n*G*og, 1, *out]
            w = conv_function(mod)(inp, filters, stride=mod.dilation, dilation=mod.stride,
                                   groups=n * G)
            for dim, k in enumerate(taps):  # -> [cg, n*G*og, *taps]
                w = w.narrow(2 + dim, 0, k)
            grad = w.transpose(0, 1).reshape(n, G * og, cg * math.prod(taps))
            if layer.has_bias:
                grad = torch.cat([grad, g.to(dtype).sum(spatial)[..., None]], dim=2)
            # the example's inputs: its views, and the frames of each
            grad = grad.reshape(groups, b, n // (groups * b), *grad.shape[1:]).sum((0, 2))
            total = grad if total is None else total + grad
        assert total is not None  # calls() raises when the layer never ran
        return total

    def factor_bytes(self, layer: Layer, groups: int) -> int:
        """Bytes of one example's ``(A, D)`` (:meth:`factors`)."""
        calls = self.calls(layer)
        rows = self.rows if self.rows is not None else calls[0][0].shape[0]
        t = groups * sum(_positions(layer, x, rows) for x, _ in calls)
        return t * (layer.d_in + layer.d_out) * calls[0][0].element_size()

    def factors(self, layer: Layer, groups: int, first: int = 0, count: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example ``(A, D)`` of a layer: ``[B, groups*T, d_in]``, ``[B, groups*T, d_out]``,
        for examples ``[first, first + count)`` (default: all B).

        Each call's rows are written straight into the per-example layout (one strided copy per
        factor: no im2col buffer, bias concatenation or transposed copy in between)."""
        calls = self.calls(layer)
        xs, gs = [x for x, _ in calls], [g for _, g in calls]
        rows = self.rows if self.rows is not None else xs[0].shape[0]
        b = rows // groups
        positions = [_positions(layer, x, rows) for x in xs]
        count = b - first if count is None else count
        if (first, count) != (0, b):  # the calls' rows of these examples, in every group
            xs = [_examples(x, groups, b, first, count) for x in xs]
            gs = [_examples(g, groups, b, first, count) for g in gs]
        total = groups * sum(positions)
        A = xs[0].new_empty(count, total, layer.d_in)
        D = gs[0].new_empty(count, total, layer.d_out)
        off = 0
        for x, g, t in zip(xs, gs, positions):
            a = A[:, off:off + groups * t].unflatten(1, (groups, t))  # [B, groups, T, d_in]
            d = D[:, off:off + groups * t].unflatten(1, (groups, t))
            _fill_inputs(layer, x, groups, a)
            _fill_output_grads(layer, g, groups, d)
            off += groups * t
        return A, D


def _examples(t: torch.Tensor, groups: int, b: int, first: int, count: int) -> torch.Tensor:
    """The rows of examples ``[first, first + count)`` of a call's input or output gradient
    (leading rows group-major, ``g * B + b``, an example's own rows together), in that layout."""
    return t.reshape(groups, b, -1)[:, first:first + count].reshape(-1, *t.shape[1:])


# A convolution's padding_mode -> F.pad's mode.
_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate",
              "circular": "circular"}


def padded_input(mod: Conv, x: torch.Tensor) -> torch.Tensor:
    """``x`` with the padding the convolution applies made explicit (its size and mode), so a
    convolution with padding 0 over it sees what the module sees."""
    pads = [v for before, after in reversed(_conv_pads(mod)) for v in (before, after)]
    return F.pad(x, pads, mode=_PAD_MODES[mod.padding_mode]) if any(pads) else x


def _conv_pads(mod: Conv) -> list[tuple[int, int]]:
    """How many samples a convolution pads before and after, per spatial dimension (the values
    come from ``padding_mode``). padding="same" puts the odd sample of an even total after, as
    torch's convolution does."""
    if mod.padding == "valid":
        return [(0, 0)] * len(mod.kernel_size)
    if mod.padding == "same":
        totals = [d * (k - 1) for k, d in zip(mod.kernel_size, mod.dilation)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(p, p) for p in cast(tuple[int, ...], mod.padding)]


def _positions(layer: Layer, x: torch.Tensor, rows: int) -> int:
    """Rows T one example contributes per call: Linear leading positions, convolution output
    positions (an input of ``rows * k`` leading rows, e.g. k windows or frames per example,
    counts k times)."""
    if layer.kind == "linear":
        return x.numel() // (x.shape[-1] * rows)
    mod = cast(Conv, layer.module)
    return x.shape[0] // rows * math.prod((size + before + after - d * (k - 1) - 1) // s + 1
                     for size, (before, after), k, s, d in zip(
                         x.shape[2:], _conv_pads(mod), mod.kernel_size, mod.stride,
                         mod.dilation))


def _patches(mod: Conv, xp: torch.Tensor) -> torch.Tensor:
    """The patches a convolution sees in its padded input ``xp [N, C, *padded]``, as a view
    ``[N, C, *out, *taps]`` (no copy: each spatial dimension unfolded into windows of the
    dilated kernel's span, then every ``dilation``-th sample of a window kept)."""
    patches = xp
    for dim, (k, s, d) in enumerate(zip(mod.kernel_size, mod.stride, mod.dilation)):
        patches = patches.unfold(2 + dim, d * (k - 1) + 1, s)  # window appended last
        if d > 1:
            patches = patches[..., ::d]
    return patches


def _fill_inputs(layer: Layer, x: torch.Tensor, groups: int, a: torch.Tensor) -> None:
    """Writes layer inputs (group-major rows ``g * B + b``) into ``a [B, groups, T, d_in]``:
    convolution patches in the weight's (C_in, *taps) order, then the bias column of ones."""
    b = a.shape[0]
    d = layer.d_in - (1 if layer.has_bias else 0)
    dst = a[..., :d]
    if layer.kind == "linear":
        src = x.reshape(groups, b, -1, d).transpose(0, 1)
        dst.copy_(src)
    else:
        mod = cast(Conv, layer.module)
        n = len(mod.kernel_size)
        patches = _patches(mod, padded_input(mod, x))  # [N, C, *out, *taps], a view
        c, out, taps = patches.shape[1], patches.shape[2:2 + n], patches.shape[2 + n:]
        frames = x.shape[0] // (groups * b)  # an example's rows per view (clip frames)
        src = patches.reshape(groups, b, frames, *patches.shape[1:])
        # -> [B, groups, frames, *out, C, *taps]
        src = src.permute(1, 0, 2, *range(4, 4 + n), 3, *range(4 + n, 4 + 2 * n))
        dst.unflatten(2, (frames, *out)).unflatten(-1, (c, *taps)).copy_(src)
    if layer.has_bias:
        a[..., d] = 1


def _fill_output_grads(layer: Layer, g: torch.Tensor, groups: int, d: torch.Tensor) -> None:
    """Writes output gradients into ``d [B, groups, T, d_out]``."""
    b = d.shape[0]
    if layer.kind == "linear":
        d.copy_(g.reshape(groups, b, -1, g.shape[-1]).transpose(0, 1))
    else:
        out = g.shape[2:]
        frames = g.shape[0] // (groups * b)  # an example's rows per view (clip frames)
        src = g.reshape(groups, b, frames, *g.shape[1:])  # -> [B, groups, frames, *out, C_out]
        d.unflatten(2, (frames, *out)).copy_(src.permute(1, 0, 2, *range(4, 4 + len(out)), 3))


def fallback_grads(
    model: nn.Module, layout: ParamLayout, per_example_loss, inputs: torch.Tensor, groups: int,
    loop: bool = False,
) -> torch.Tensor:
    """Per-example gradients ``[B, fallback_numel]`` of the fallback parameters, by torch.func.

    ``inputs`` are the encoder inputs (group-major ``[groups*B, ...]``); ``per_example_loss(out,
    batch)`` maps the encoder output to per-example losses. Examples are batched by
    ``torch.func.vmap``, or taken one at a time (``loop``: for modules vmap has no batching rule
    for, e.g. a GRU, or a transformer's nested-tensor path); a vmap failure is a
    :class:`VmapUnsupported` holding the error.
    """
    from torch.func import functional_call, grad, vmap

    params = {fb.name: fb.param.detach() for fb in layout.fallback}
    b = inputs.shape[0] // groups
    per_ex = inputs.reshape(groups, b, *inputs.shape[1:]).transpose(0, 1)  # [B, groups, ...]

    def loss_one(p: dict, x: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, p, (x,))
        return per_example_loss(out, 1).sum()

    if loop:
        each = [grad(loss_one)(params, per_ex[i]) for i in range(b)]
        grads = {name: torch.stack([g[name] for g in each]) for name in params}
    else:
        try:
            grads = vmap(grad(loss_one), in_dims=(None, 0))(params, per_ex)
        except (MemoryError, torch.cuda.OutOfMemoryError):
            raise  # (not vmap's doing: one example at a time would not be the cure)
        except Exception as exc:  # (vmap's errors have no type of their own)
            raise VmapUnsupported(exc) from exc
    return torch.cat([grads[fb.name].reshape(b, -1) for fb in layout.fallback], dim=1)


class VmapUnsupported(RuntimeError):
    """``torch.func.vmap`` failed on the encoder (``error``): take the examples one at a time."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.error = error
