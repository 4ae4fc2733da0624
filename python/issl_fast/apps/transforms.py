"""Deterministic image and signal transforms for transform-tolerant duplicate search.

A near-duplicate is often the same picture moved by a pixel or two (a re-crop, a re-encode with a
different border). Gradient features, like most representations of a conv net with strided
layers, are not shift-invariant, so such a copy can look less similar than two different images.
Comparing every example's transformed copies t(x_i) against the store as well, and keeping the
best similarity per pair, finds those copies (see ``InfluenceSSL.neighbours(transforms=...)``).
For signals ``[..., L]`` the same holds for a recording cut a few samples later: :func:`shifts`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import count


@dataclass(frozen=True)
class Translation:
    """Moves images ``[..., H, W]`` by ``dy`` rows and ``dx`` columns (positive: down / right);
    the uncovered border is filled with ``fill`` (nothing wraps around)."""

    dy: int
    dx: int
    fill: float = 0.0

    @property
    def name(self) -> str:
        return f"shift(dy={self.dy:+d}, dx={self.dx:+d})"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 2:
            raise ValueError(f"images must be [..., H, W], got shape {tuple(x.shape)}")
        H, W = x.shape[-2:]
        if abs(self.dy) >= H or abs(self.dx) >= W:
            raise ValueError(f"shift ({self.dy}, {self.dx}) does not fit images of size {H}x{W}")
        out = torch.full_like(x, self.fill)
        src_y, dst_y = _span(self.dy, H)
        src_x, dst_x = _span(self.dx, W)
        out[..., dst_y, dst_x] = x[..., src_y, src_x]
        return out


def _span(shift: int, size: int) -> tuple[slice, slice]:
    """(source, destination) slices of one axis for a shift that drops what leaves the image."""
    if shift >= 0:
        return slice(0, size - shift), slice(shift, size)
    return slice(-shift, size), slice(0, size + shift)


def translations(pixels: int = 1, diagonal: bool = False, fill: float = 0.0) -> list[Translation]:
    """The shifts by up to ``pixels`` along each axis (4 per distance), plus the diagonal ones
    when ``diagonal``; the identity is not included (the plain search covers it)."""
    pixels = count(pixels, "pixels")
    out = []
    for d in range(1, pixels + 1):
        out += [Translation(d, 0, fill), Translation(-d, 0, fill), Translation(0, d, fill),
                Translation(0, -d, fill)]
        if diagonal:
            out += [Translation(dy, dx, fill) for dy in (d, -d) for dx in (d, -d)]
    return out


@dataclass(frozen=True)
class Shift:
    """Moves signals ``[..., L]`` by ``samples`` along their last axis (positive: later); the
    uncovered end is filled with ``fill``, or with ``circular`` what leaves wraps around."""

    samples: int
    fill: float = 0.0
    circular: bool = False

    @property
    def name(self) -> str:
        return f"shift({self.samples:+d}{', circular' if self.circular else ''})"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 1:
            raise ValueError(f"signals must be [..., L], got shape {tuple(x.shape)}")
        L = x.shape[-1]
        if abs(self.samples) >= L:
            raise ValueError(f"shift {self.samples} does not fit signals of length {L}")
        if self.circular:
            return torch.roll(x, self.samples, dims=-1)
        out = torch.full_like(x, self.fill)
        src, dst = _span(self.samples, L)
        out[..., dst] = x[..., src]
        return out


def shifts(samples: int = 1, circular: bool = False, fill: float = 0.0) -> list[Shift]:
    """The shifts of signals by 1 .. ``samples`` samples either way (2 per distance); the
    identity is not included (the plain search covers it)."""
    samples = count(samples, "samples")
    return [Shift(s, fill, circular) for d in range(1, samples + 1) for s in (d, -d)]
