"""Fused capture for ``nn.MultiheadAttention``: its projections as two tracked Linear layers.

torch's attention applies its packed input projection (``in_proj_weight``, ``[3E, E]``) and its
output projection (``out_proj``) with ``F.linear`` inside ``F.multi_head_attention_forward``, so
module hooks never see them. While a :class:`~issl_fast.capture.FactorCapture` is open, a wrapper
of ``torch.nn.functional.linear`` hands every call to the innermost open capture of the calling
thread; that capture's :class:`FunctionalLinear` records the calls made inside the forward of a
tracked attention module whose weight is that module's projection (or a row slice of the packed
one): the input as the layer's ``A`` and the output, whose gradient becomes ``D``. Every other
call passes through untouched. The wrapper is installed while any capture is open, in any thread
(reference counted), and torch's own function is restored when the last one closes.

Inside the attention function the tensors are sequence-first (``[T, N, E]``; the output
projection sees ``[T * N, E]``), so inputs and gradients are turned batch-first here. A row slice
(cross-attention: query and key/value projected separately) records the rows it covers; its
gradient is zero-padded to all ``3E`` rows, so the layer's calls still sum to its gradient. A
direct call of ``out_proj`` as a module, outside the attention's forward, is recorded by an
ordinary module hook; a tracked ``in_proj_weight`` used outside its module's forward is an error
(no hook can see it).

Only the common form is fused: one packed projection (``kdim = vdim = embed_dim``) and no
``bias_k`` / ``bias_v``. Other attention modules keep the torch.func fallback.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


def fusable(mha: nn.MultiheadAttention) -> bool:
    """Whether the projections of ``mha`` can be captured as two Linear layers."""
    return bool(mha._qkv_same_embed_dim) and mha.bias_k is None and mha.bias_v is None


# -- the process-wide wrapper ---------------------------------------------------------------------
_lock = threading.Lock()
_installed = 0  # open FunctionalLinear contexts, all threads
_torch_linear: Callable[..., torch.Tensor] | None = None
_local = threading.local()  # .stack: this thread's open FunctionalLinear contexts


def _linear(input: torch.Tensor, weight: torch.Tensor,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    assert _torch_linear is not None
    out = _torch_linear(input, weight, bias)
    stack = getattr(_local, "stack", None)
    if stack:
        stack[-1].on_linear(input, weight, out)
    return out


def _install() -> None:
    global _installed, _torch_linear
    with _lock:
        if _installed == 0:
            _torch_linear = F.linear
            F.linear = _linear  # the attention function looks `linear` up at call time
        _installed += 1


def _uninstall() -> None:
    global _installed, _torch_linear
    with _lock:
        _installed -= 1
        if _installed == 0:
            assert _torch_linear is not None
            F.linear = _torch_linear
            _torch_linear = None


# -- one capture's recorder -----------------------------------------------------------------------
@dataclass
class _Tracked:
    in_layer: tuple[str, int] | None = None  # (layer name, its width 3E)
    out_layer: tuple[str, int] | None = None
    active: list[int] = field(default_factory=list)  # N of each open forward (nested calls)


class FunctionalLinear:
    """Records the ``F.linear`` calls of tracked attention projections (see module doc).

    ``record(layer_name, input_batch_first, output, post)`` receives each call; ``post`` maps the
    output's gradient to the batch-first, full-width ``D`` of the layer."""

    def __init__(self, record: Callable[..., None]) -> None:
        self._record = record
        self._tracked: dict[int, tuple[nn.MultiheadAttention, _Tracked]] = {}
        self._open: list[nn.MultiheadAttention] = []  # attention forwards running, innermost last
        self._handles: list = []
        self._thread = 0
        self._in_weights: dict[int, str] = {}  # id(in_proj_weight) -> its layer name

    def track(self, layer_name: str, owner: nn.MultiheadAttention, which: str, d_out: int) -> None:
        """``which``: "in" (the packed q/k/v projection) or "out" (out_proj)."""
        _, t = self._tracked.setdefault(id(owner), (owner, _Tracked()))
        if which == "in":
            t.in_layer = (layer_name, d_out)
        else:
            t.out_layer = (layer_name, d_out)

    def __enter__(self) -> FunctionalLinear:
        if not self._tracked:
            return self
        self._thread = threading.get_ident()
        self._in_weights = {id(o.in_proj_weight): t.in_layer[0]
                            for o, t in self._tracked.values() if t.in_layer is not None}
        for owner, t in self._tracked.values():
            self._handles.append(owner.register_forward_pre_hook(self._enter_forward,
                                                                 with_kwargs=True))
            self._handles.append(owner.register_forward_hook(self._exit_forward,
                                                             always_call=True))
            if t.out_layer is not None:
                self._handles.append(owner.out_proj.register_forward_hook(self._module_call))
        _install()
        stack = getattr(_local, "stack", None)
        if stack is None:
            stack = _local.stack = []
        stack.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._handles:
            return
        _local.stack.remove(self)
        _uninstall()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._open.clear()

    # -- hooks ------------------------------------------------------------------------------------
    def _enter_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if threading.get_ident() != self._thread:
            return
        query = args[0] if args else kwargs["query"]
        if query.dim() != 3:
            raise ValueError(
                f"nn.MultiheadAttention got an unbatched query of shape {tuple(query.shape)}: "
                "featurising needs [N, T, E] (batch_first) or [T, N, E] inputs"
            )
        assert isinstance(module, nn.MultiheadAttention)
        self._tracked[id(module)][1].active.append(
            query.shape[0] if module.batch_first else query.shape[1])
        self._open.append(module)

    def _exit_forward(self, module: nn.Module, args: tuple, output: object) -> None:
        if threading.get_ident() != self._thread or not self._open:
            return
        self._open.pop()
        self._tracked[id(module)][1].active.pop()

    def _module_call(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        """out_proj called as a module, outside its attention's forward: a batch-first Linear."""
        if threading.get_ident() != self._thread or not output.requires_grad:
            return
        owner = next(o for o, t in self._tracked.values() if o.out_proj is module)
        t = self._tracked[id(owner)][1]
        if not t.active and t.out_layer is not None and torch.is_grad_enabled():
            self._record(t.out_layer[0], args[0].detach(), output, None)

    # -- the F.linear calls -----------------------------------------------------------------------
    def on_linear(self, input: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
        if not (torch.is_grad_enabled() and out.requires_grad):
            return
        if not self._open:
            self._check_outside(weight)
            return
        owner = self._open[-1]
        t = self._tracked[id(owner)][1]
        if t.in_layer is not None and (weight is owner.in_proj_weight
                                       or weight._base is owner.in_proj_weight):
            # a row slice (split / chunk along dim 0) starts at its storage offset's row
            row0 = ((weight.storage_offset() - owner.in_proj_weight.storage_offset())
                    // owner.in_proj_weight.stride(0))
            name, width = t.in_layer
        elif t.out_layer is not None and weight is owner.out_proj.weight:
            row0, (name, width) = 0, t.out_layer
        else:
            return
        n = t.active[-1]

        def batch_first(x: torch.Tensor) -> torch.Tensor:  # [T, N, C] / [T * N, C] -> [N, T, C]
            return x.reshape(-1, n, x.shape[-1]).transpose(0, 1)

        def post(g: torch.Tensor) -> torch.Tensor:
            g = batch_first(g)
            if g.shape[-1] == width:
                return g
            full = g.new_zeros(*g.shape[:-1], width)
            full[..., row0:row0 + g.shape[-1]] = g
            return full

        self._record(name, batch_first(input.detach()), out, post)

    def _check_outside(self, weight: torch.Tensor) -> None:
        name = self._in_weights.get(id(weight))
        if name is None and weight._base is not None:
            name = self._in_weights.get(id(weight._base))
        if name is not None:
            raise RuntimeError(
                f"the tracked attention projection {name!r} was applied outside its "
                "nn.MultiheadAttention's forward, where the fused capture cannot follow it: "
                "track its parameters by name (track=[...]) to take the torch.func path"
            )
