"""How per-example gradients become fixed-size features ``phi``.

- ``dense``: exactly the JL sketch ``R g / sqrt(k)`` of the full concatenated per-example
  gradient (hash version 1 matrix, column = flat parameter index), summed over layers with their
  column offsets: fused ``sketch_linear`` for Linear/convolutions, ``sketch_dense`` for the rest.
- ``kron``: per layer the factored sketch ``vec(P_out G P_in^T)`` (``sketch_kron``) with
  ``k_in * k_out`` outputs, concatenated over layers; fallback parameters get a dense sketch of
  ``k_fallback`` outputs. Each layer has its own seed (derived from ``seed`` and its index).
- ``identity``: the flat gradient itself (no sketch): for small models and exactness tests.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

from . import reference
from ._checks import count
from .capture import ParamLayout

KINDS = ("dense", "kron", "identity")
Dist = Literal["rademacher", "gaussian"]  # as issl_fast.ops.Dist


@dataclass(frozen=True)
class Projection:
    """``Projection("kron", k=256)``: per-layer k_in * k_out ~= k (k_in = k_out = sqrt(k) unless
    given). ``Projection("dense", k=4096)``: total dimension k. ``Projection("identity")``."""

    kind: str = "kron"
    k: int = 256
    k_in: int | None = None
    k_out: int | None = None
    k_fallback: int = 512
    seed: int = 0
    dist: Dist = "rademacher"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"projection kind must be one of {KINDS}, got {self.kind!r}")
        if self.dist not in ("rademacher", "gaussian"):
            raise ValueError(f"dist must be 'rademacher' or 'gaussian', got {self.dist!r}")
        for name in ("k", "k_fallback"):  # (as ints: the config is JSON in every store)
            object.__setattr__(self, name, count(getattr(self, name), name))
        for name in ("k_in", "k_out"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, count(getattr(self, name), f"{name} (or None)"))

    def config(self) -> dict:
        return asdict(self)

    def kron_dims(self) -> tuple[int, int]:
        """(k_in, k_out) requested per layer before clamping to the layer's own dims."""
        if self.k_in is not None and self.k_out is not None:
            return self.k_in, self.k_out
        if self.k_in is not None:
            return self.k_in, max(1, self.k // self.k_in)
        if self.k_out is not None:
            return max(1, self.k // self.k_out), self.k_out
        k_in = math.isqrt(self.k)
        return k_in, max(1, self.k // k_in)


@dataclass(frozen=True)
class Block:
    """A contiguous range of phi belonging to one layer (or to the fallback parameters)."""

    name: str
    start: int
    stop: int
    # "kron" | "kron_grouped" (a grouped conv: the same projection of its exact gradient, no
    # K-FAC factors) | "dense" | "identity"
    kind: str
    k_in: int = 0  # kron: phi[start:stop] is vec of a [k_out, k_in] matrix
    k_out: int = 0
    seed: int = 0

    @property
    def dim(self) -> int:
        return self.stop - self.start


def layer_seed(seed: int, index: int) -> int:
    """Independent per-layer seed for kron sketches."""
    return reference._mix_int(int(seed) + (index + 1) * reference._PHI)


def plan_blocks(proj: Projection, layout: ParamLayout) -> list[Block]:
    """The blocks of phi for this projection and parameter layout (their union is [0, dim))."""
    if proj.kind == "dense":
        return [Block("all", 0, proj.k, "dense", seed=proj.seed)]
    blocks: list[Block] = []
    off = 0
    if proj.kind == "identity":
        for layer in layout.layers:
            blocks.append(Block(layer.name, off, off + layer.numel, "identity"))
            off += layer.numel
        if layout.fallback:
            n = layout.fallback_numel
            blocks.append(Block("fallback", off, off + n, "identity"))
        return blocks
    k_in, k_out = proj.kron_dims()
    for i, layer in enumerate(layout.layers):
        ki, ko = min(k_in, layer.d_in), min(k_out, layer.d_out)
        kind = "kron_grouped" if layer.groups > 1 else "kron"
        blocks.append(
            Block(layer.name, off, off + ki * ko, kind, ki, ko, layer_seed(proj.seed, i))
        )
        off += ki * ko
    if layout.fallback:
        kf = min(proj.k_fallback, layout.fallback_numel)
        blocks.append(
            Block(
                "fallback", off, off + kf, "dense", seed=layer_seed(proj.seed, len(layout.layers))
            )
        )
    return blocks
