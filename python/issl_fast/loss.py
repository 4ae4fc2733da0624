"""The label-free loss of Influence-SSL: stability of an encoder's representation under
augmentation.

For an example x with views ``T_1 x .. T_K x`` (seeded: :mod:`issl_fast.augment`)::

    l(x; theta) = (1/K) sum_v [1 - cos(f(x), f(T_v x))]          (anchor form, default)
    l(x; theta) = (2/K) sum_p [1 - cos(f(T_2p-1 x), f(T_2p x))]   (two_view=True, K even)

The two-view form (K = 2: the paper's variant; K = 2m averages m pairs) never uses the clean
image, so with many views it averages over the augmentation distribution (e.g. crop positions)
and depends less on the exact pixel alignment of x.

``l`` is separable per example (no in-batch negatives), so per-example gradients are well defined,
and it is evaluated with the encoder in eval mode (BatchNorm statistics and dropout frozen):
influence is measured at fixed theta. Gradients flow through both branches of the cosine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .augment import AugmentFn, SSLAugment

# Cosine similarity guard for zero representations (e.g. a dead ReLU feature map).
_COS_EPS = 1e-8


class AugmentationStability:
    """Per-example augmentation-stability loss.

    Args:
        views: K, the number of augmented views per example.
        seed: seed of the default :class:`SSLAugment` (ignored when ``augment`` is given).
        augment: ``augment(x, ids, view) -> x_hat``; default ``SSLAugment(seed=seed)`` (views
            shared by every example: exact duplicates get identical features).
        two_view: compare pairs of views ``1 - cos(f(T_2p-1 x), f(T_2p x))`` instead of each
            view with the clean anchor (needs an even K).
        representation: maps the encoder's output to the representation z (e.g. pick the
            backbone features of a (features, projection) tuple); default: the output itself.
    """

    def __init__(
        self,
        views: int = 4,
        seed: int = 0,
        augment: AugmentFn | None = None,
        two_view: bool = False,
        representation: Callable[[Any], torch.Tensor] | None = None,
    ) -> None:
        if not isinstance(views, int) or views < 1:
            raise ValueError(f"views must be an int >= 1, got {views!r}")
        if two_view and views % 2:
            raise ValueError(f"two_view=True compares pairs of views: views must be even, "
                             f"got {views}")
        self.views = views
        self.seed = seed
        self.augment: AugmentFn = augment if augment is not None else SSLAugment(seed=seed)
        self.two_view = two_view
        self.representation = representation

    @property
    def groups(self) -> int:
        """Inputs per example fed to the encoder (the clean anchor and/or its views)."""
        return self.views if self.two_view else self.views + 1

    def config(self) -> dict[str, Any]:
        """Everything that determines the loss (part of a store's fingerprint)."""
        aug = (
            self.augment.config()
            if hasattr(self.augment, "config")
            else {
                "kind": "callable",
                "name": getattr(self.augment, "__qualname__", repr(self.augment)),
            }
        )
        rep = (
            None
            if self.representation is None
            else getattr(self.representation, "__qualname__", repr(self.representation))
        )
        return {
            "kind": "AugmentationStability",
            "views": self.views,
            "two_view": self.two_view,
            "augment": aug,
            "representation": rep,
            # half-precision representations are compared in float32 (from_outputs); stores
            # featurised before that rule (when bf16 features were mostly rounding) differ
            "compare_dtype": "float32",
        }

    def encoder_inputs(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``[groups * B, ...]``: group-major stack (group g of example b is row ``g * B + b``)."""
        views = [self.augment(x, ids, v) for v in range(1, self.views + 1)]
        return torch.cat(views if self.two_view else [x, *views], dim=0)

    def from_outputs(self, out: Any, batch: int) -> torch.Tensor:
        """Per-example losses ``[B]`` from the encoder's output on :meth:`encoder_inputs`."""
        z = out if self.representation is None else self.representation(out)
        if not isinstance(z, torch.Tensor):
            raise TypeError(
                f"the representation must be a tensor, got {type(z).__name__}; pass "
                "representation=... to pick it from the encoder's output"
            )
        if z.dim() == 0 or z.shape[0] != self.groups * batch:
            raise ValueError(
                f"the representation must have the batch first, {self.groups * batch} rows "
                f"({self.groups} views x {batch} examples), got shape {tuple(z.shape)}: a "
                "sequence-first output [T, N, d] needs representation=lambda out: "
                "out.transpose(0, 1) (or a pooled token)")
        z = z.reshape(self.groups, batch, -1)
        if z.dtype in (torch.float16, torch.bfloat16):
            # 1 - cos of nearby views cancels most of its digits: in half precision the loss and
            # its gradient would be mostly rounding (bf16 features off by ~50%). The cast keeps
            # the encoder's own arithmetic as it is and the gradient flows back through it.
            z = z.float()
        if self.two_view:
            cos = F.cosine_similarity(z[0::2], z[1::2], dim=-1, eps=_COS_EPS)  # [K/2, B]
            return (1 - cos).mean(dim=0)
        cos = F.cosine_similarity(z[:1], z[1:], dim=-1, eps=_COS_EPS)  # [K, B]
        return (1 - cos).mean(dim=0)

    def __call__(self, encoder: nn.Module, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Per-example losses ``[B]`` (the encoder should already be in eval mode)."""
        return self.from_outputs(encoder(self.encoder_inputs(x, ids)), x.shape[0])
