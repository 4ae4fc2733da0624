"""Fused capture for ``nn.MultiheadAttention``: its projections as two tracked Linear layers.

torch's attention applies its packed input projection (``in_proj_weight``, ``[3E, E]``) and its
output projection (``out_proj``) with ``F.linear`` inside ``F.multi_head_attention_forward``, so
module hooks never see them. While a :class:`~issl_fast.capture.FactorCapture` is open,
:class:`FunctionalLinear` wraps ``torch.nn.functional.linear`` and records the calls whose weight
is one of the tracked projections (or a row slice of the packed one): the input as the layer's
``A`` and the output, whose gradient becomes ``D``. Calls with any other weight pass through.

Inside the attention function the tensors are sequence-first (``[T, N, E]``; the output
projection sees ``[T * N, E]``), so inputs and gradients are turned batch-first here. A row slice
(cross-attention: query and key/value projected separately) records the rows it covers; its
gradient is zero-padded to all ``3E`` rows, so the layer's calls still sum to its gradient.

Only the common form is fused: one packed projection (``kdim = vdim = embed_dim``) and no
``bias_k`` / ``bias_v``. Other attention modules keep the torch.func fallback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def fusable(mha: nn.MultiheadAttention) -> bool:
    """Whether the projections of ``mha`` can be captured as two Linear layers."""
    return bool(mha._qkv_same_embed_dim) and mha.bias_k is None and mha.bias_v is None


@dataclass
class _Target:
    layer_name: str
    owner: nn.MultiheadAttention
    d_out: int


class FunctionalLinear:
    """Records ``F.linear`` calls of tracked attention projections while open (see module doc).

    ``record(layer_name, input_batch_first, output, post)`` receives each call; ``post`` maps the
    output's gradient to the batch-first, full-width ``D`` of the layer."""

    def __init__(self, record: Callable[..., None]) -> None:
        self._record = record
        self._targets: dict[int, _Target] = {}  # id(weight parameter) -> where it goes
        self._batch: dict[int, int] = {}  # id(attention module) -> N of its current call
        self._handles: list = []
        self._original: Callable[..., torch.Tensor] | None = None

    def track(self, layer_name: str, weight: torch.Tensor, owner: nn.MultiheadAttention,
              d_out: int) -> None:
        self._targets[id(weight)] = _Target(layer_name, owner, d_out)

    def __enter__(self) -> FunctionalLinear:
        if not self._targets:
            return self
        for owner in {id(t.owner): t.owner for t in self._targets.values()}.values():
            self._handles.append(owner.register_forward_pre_hook(self._note_batch,
                                                                 with_kwargs=True))
        self._original = F.linear
        F.linear = self._linear  # the attention function looks `linear` up at call time
        return self

    def __exit__(self, *exc: object) -> None:
        if self._original is not None:
            F.linear = self._original
            self._original = None
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _note_batch(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        query = args[0] if args else kwargs["query"]
        if query.dim() != 3:
            raise ValueError(
                f"nn.MultiheadAttention got an unbatched query of shape {tuple(query.shape)}: "
                "featurising needs [N, T, E] (batch_first) or [T, N, E] inputs"
            )
        mha = module
        assert isinstance(mha, nn.MultiheadAttention)
        self._batch[id(module)] = query.shape[0] if mha.batch_first else query.shape[1]

    def _match(self, weight: torch.Tensor) -> tuple[_Target, int] | None:
        target = self._targets.get(id(weight))
        if target is not None:
            return target, 0
        base = weight._base
        target = self._targets.get(id(base)) if base is not None else None
        if target is None or base is None:
            return None
        # A row slice of the packed projection (split / chunk along dim 0): its first row.
        return target, (weight.storage_offset() - base.storage_offset()) // base.stride(0)

    def _linear(self, input: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        assert self._original is not None
        out = self._original(input, weight, bias)
        hit = self._match(weight)
        if hit is None or not (torch.is_grad_enabled() and out.requires_grad):
            return out
        target, row0 = hit
        n = self._batch[id(target.owner)]
        width = target.d_out

        def batch_first(t: torch.Tensor) -> torch.Tensor:  # [T, N, C] or [T * N, C] -> [N, T, C]
            return t.reshape(-1, n, t.shape[-1]).transpose(0, 1)

        def post(g: torch.Tensor) -> torch.Tensor:
            g = batch_first(g)
            if g.shape[-1] == width:
                return g
            full = g.new_zeros(*g.shape[:-1], width)
            full[..., row0:row0 + g.shape[-1]] = g
            return full

        self._record(target.layer_name, batch_first(input.detach()), out, post)
        return out
