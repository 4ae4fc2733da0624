"""Fused capture for ``nn.MultiheadAttention``: its projections as two tracked Linear layers.

torch's attention applies its packed input projection (``in_proj_weight``, ``[3E, E]``) and its
output projection (``out_proj``) with ``F.linear`` inside ``F.multi_head_attention_forward``, so
module hooks never see them. While any :class:`~issl_fast.capture.FactorCapture` is open, in any
thread, ``torch.nn.functional.linear`` is a wrapper (installed and removed reference-counted; it
always calls torch's own function). A capture's :class:`FunctionalLinear` hooks the forward of
each attention module it tracks: while that forward runs, the calling thread's record of open
attention forwards says which module (and which captures) the ``F.linear`` calls belong to, and a
call whose weight is that module's projection (or a row slice of the packed one) is recorded: the
input as the layer's ``A`` and the output, whose gradient becomes ``D``. Every other call passes
through untouched.

Inside the attention function the tensors are sequence-first (``[T, N, E]``; the output
projection sees ``[T * N, E]``), so inputs and gradients are turned batch-first here. A row slice
(cross-attention: query and key/value projected separately) records the rows it covers; its
gradient is zero-padded to all ``3E`` rows, so the layer's calls still sum to its gradient. A
direct call of ``out_proj`` as a module, outside its attention's forward, is recorded by an
ordinary module hook; a tracked ``in_proj_weight`` used outside its module's forward is an error
(nothing can see it there).

Only the common form is fused: one packed projection (``kdim = vdim = embed_dim``) and no
``bias_k`` / ``bias_v``. Other attention modules keep the torch.func fallback.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# torch's own function, taken once: the wrapper and stale references to it always reach it.
_TORCH_LINEAR: Callable[..., torch.Tensor] = F.linear
_lock = threading.Lock()
_installed = 0  # open FunctionalLinear contexts, all threads
_local = threading.local()  # .forwards: this thread's open attention forwards; .open: captures


def fusable(mha: nn.MultiheadAttention) -> bool:
    """Whether the projections of ``mha`` can be captured as two Linear layers."""
    return bool(mha._qkv_same_embed_dim) and mha.bias_k is None and mha.bias_v is None


@dataclass
class _Forward:
    """One open attention forward, as one capture sees it."""

    capture: FunctionalLinear
    module: nn.MultiheadAttention
    batch: int | None  # N of its query (None when gradients are off: nothing is recorded)


def _thread_list(name: str) -> list:
    found = getattr(_local, name, None)
    if found is None:
        found = []
        setattr(_local, name, found)
    return found


def _linear(input: torch.Tensor, weight: torch.Tensor,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    out = _TORCH_LINEAR(input, weight, bias)
    forwards: list[_Forward] = getattr(_local, "forwards", [])
    if forwards:
        # The innermost attention forward, as seen by every capture tracking that module.
        top = forwards[-1].module
        for f in reversed(forwards):
            if f.module is not top:
                break
            f.capture.on_linear(f, input, weight, out)
    else:
        for capture in getattr(_local, "open", []):
            capture.check_outside(weight)
    return out


def _install() -> None:
    global _installed
    with _lock:
        if _installed == 0:
            F.linear = _linear  # the attention function looks `linear` up at call time
        _installed += 1


def _uninstall() -> None:
    global _installed
    with _lock:
        _installed -= 1
        if _installed == 0:
            F.linear = _TORCH_LINEAR


@dataclass
class _Tracked:
    in_layer: tuple[str, int] | None = None  # (layer name, its width 3E)
    out_layer: tuple[str, int] | None = None


class FunctionalLinear:
    """Records the ``F.linear`` calls of tracked attention projections (see module doc).

    ``record(layer_name, input_batch_first, output, post)`` receives each call; ``post`` maps the
    output's gradient to the batch-first, full-width ``D`` of the layer."""

    def __init__(self, record: Callable[..., None]) -> None:
        self._record = record
        self._tracked: dict[int, tuple[nn.MultiheadAttention, _Tracked]] = {}
        self._handles: list = []
        self._thread: int | None = None  # the thread that opened it (None: closed)
        self.recording = True  # False once backward() starts (checkpointed recomputations)
        self._in_weights: dict[int, str] = {}  # id(in_proj_weight) -> its layer name
        # That thread's lists (kept: the capture may be closed from another thread)
        self._open: list[FunctionalLinear] = []
        self._forwards: list[_Forward] = []

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
        if self._thread is not None:
            raise RuntimeError("this capture is already open")
        self._thread = threading.get_ident()
        self._in_weights = {id(o.in_proj_weight): t.in_layer[0]
                            for o, t in self._tracked.values() if t.in_layer is not None}
        _install()
        self._open, self._forwards = _thread_list("open"), _thread_list("forwards")
        self._open.append(self)
        try:
            for owner, t in self._tracked.values():
                self._handles.append(owner.register_forward_pre_hook(self._enter_forward,
                                                                     with_kwargs=True))
                self._handles.append(owner.register_forward_hook(self._exit_forward,
                                                                 always_call=True))
                if t.out_layer is not None:
                    self._handles.append(owner.out_proj.register_forward_hook(self._module_call))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is None:
            return
        try:
            for h in self._handles:
                h.remove()
            self._handles.clear()
            if self in self._open:
                self._open.remove(self)
            self._forwards[:] = [f for f in self._forwards if f.capture is not self]
        finally:
            self._thread = None
            _uninstall()

    # -- hooks ------------------------------------------------------------------------------------
    def _enter_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if threading.get_ident() != self._thread or not self.recording:
            return
        assert isinstance(module, nn.MultiheadAttention)
        query = args[0] if args else kwargs["query"]
        forward = _Forward(self, module, None)
        _thread_list("forwards").append(forward)  # first: the exit hook pops it even if we raise
        if torch.is_grad_enabled():
            if query.dim() != 3:
                raise ValueError(
                    f"nn.MultiheadAttention got an unbatched query of shape "
                    f"{tuple(query.shape)}: featurising needs [N, T, E] (batch_first) or "
                    "[T, N, E] inputs"
                )
            forward.batch = query.shape[0] if module.batch_first else query.shape[1]

    def _exit_forward(self, module: nn.Module, args: tuple, output: object) -> None:
        if threading.get_ident() != self._thread:
            return
        forwards = getattr(_local, "forwards", [])
        for i in range(len(forwards) - 1, -1, -1):
            if forwards[i].capture is self and forwards[i].module is module:
                del forwards[i]
                return

    def _module_call(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        """out_proj called as a module, outside its attention's forward: a batch-first Linear."""
        if (threading.get_ident() != self._thread or not torch.is_grad_enabled()
                or not self.recording):
            return
        if not output.requires_grad:
            return
        owner, t = next(v for v in self._tracked.values() if v[0].out_proj is module)
        inside = any(f.capture is self and f.module is owner
                     for f in getattr(_local, "forwards", []))
        if not inside and t.out_layer is not None:
            self._record(t.out_layer[0], args[0].detach(), output, None)

    # -- the F.linear calls -----------------------------------------------------------------------
    def on_linear(self, forward: _Forward, input: torch.Tensor, weight: torch.Tensor,
                  out: torch.Tensor) -> None:
        if forward.batch is None or not (torch.is_grad_enabled() and out.requires_grad):
            return
        owner, n = forward.module, forward.batch
        t = self._tracked[id(owner)][1]
        packed = owner.in_proj_weight
        if t.in_layer is not None and (weight is packed or weight._base is packed):
            # a row slice (split / chunk along dim 0) starts at its storage offset's row
            row0 = (weight.storage_offset() - packed.storage_offset()) // packed.stride(0)
            name, width = t.in_layer
        elif t.out_layer is not None and weight is owner.out_proj.weight:
            row0, (name, width) = 0, t.out_layer
        else:
            return

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

    def check_outside(self, weight: torch.Tensor) -> None:
        """A tracked packed projection used outside any attention forward cannot be captured."""
        if not self._in_weights or not torch.is_grad_enabled() or not self.recording:
            return
        name = self._in_weights.get(id(weight))
        if name is None and weight._base is not None:
            name = self._in_weights.get(id(weight._base))
        if name is not None:
            raise RuntimeError(
                f"the tracked attention projection {name!r} was applied outside its "
                "nn.MultiheadAttention's forward, where the fused capture cannot follow it: "
                "track its parameters by name (track=[...]) to take the torch.func path"
            )
