"""Batched, seeded tensor augmentations for the label-free loss.

Every random parameter of an example's view is a pure function of ``(seed, view)`` (the default,
``shared=True``: every example gets the same K transforms) or of ``(seed, example id, view)``
(``shared=False``) through the project's counter-based hash (:mod:`issl_fast.reference`, role
``augment``), so the same example gets the same views in any batch, order or process — which is
what makes stored gradient features reproducible and resumable.

Images are float tensors ``[B, C, H, W]`` (any C; saturation, hue and grayscale need C = 3,
other channel counts get brightness/contrast jitter only), values nominally in [0, 1]; integer
images are refused (scale them first). Views keep the input size and are not clamped: jitter,
blur of the border and noise may take values outside [0, 1] (normalised inputs, with negative
values, work as they are). Example ids must be < 2**48 and view numbers < 2**16 (they share one
64-bit counter).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from . import reference

# Hash stream of the augmentations; the sketch roles use 0..3 (csrc/include/issl_fast/hash.h).
_AUGMENT_STREAM = 8
# Uniform draws per (example, view): one fixed slot per parameter, so adding an augmentation
# never shifts another's randomness.
_N_PARAMS = 16
(
    _U_CROP_AREA,
    _U_CROP_RATIO,
    _U_CROP_X,
    _U_CROP_Y,
    _U_FLIP,
    _U_JITTER_P,
    _U_BRIGHT,
    _U_CONTRAST,
    _U_SAT,
    _U_HUE,
    _U_GRAY,
    _U_BLUR_P,
    _U_BLUR_SIGMA,
    _U_NOISE_SEED,
) = range(14)


class AugmentFn(Protocol):
    """Any callable ``augment(x, ids, view) -> x_hat`` can replace :class:`SSLAugment`. ``x`` is
    on the encoder's device (a GPU when the encoder is there) and ``x_hat`` must be too; ``ids``
    is a CPU int64 tensor."""

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, view: int) -> torch.Tensor: ...


# Views are drawn from one 64-bit counter ``id * 2**16 + view``.
MAX_VIEW = 1 << 16
MAX_ID = 1 << 48


def view_uniforms(
    seed: int, ids: torch.Tensor | np.ndarray, view: int, n: int = _N_PARAMS
) -> np.ndarray:
    """``[B, n]`` float64 uniforms in [0, 1) that depend only on ``(seed, id, view, slot)``."""
    key = reference._mix_int(reference._mix_int(int(seed)) + (_AUGMENT_STREAM + 1) * reference._PHI)
    ids = np.asarray(torch.as_tensor(ids).cpu().numpy(), dtype=np.int64)
    if ids.ndim != 1:
        raise ValueError(f"ids must be 1-D [B], got shape {ids.shape}")
    if (ids < 0).any():
        raise ValueError("example ids must be >= 0")
    if len(ids) and int(ids.max()) >= MAX_ID:
        # (id and view share one 64-bit counter: larger ids would repeat smaller ones' views)
        raise ValueError(f"example ids must be < 2**48 for seeded views, got {int(ids.max())}: "
                         "number examples (e.g. by dataset index) instead of hashing them")
    if not 0 <= view < MAX_VIEW:
        raise ValueError(f"view must be in [0, 2**16), got {view}")
    # Column = (id, view) folded into one 64-bit counter; word = parameter slot.
    cols = ids.astype(np.uint64) * np.uint64(1 << 16) + np.uint64(view)
    ck = reference.column_keys(key, cols)
    h = reference.hash_words(ck[:, None], np.arange(n, dtype=np.uint64)[None, :])
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


@dataclass(frozen=True)
class SSLAugment:
    """SimCLR-style view generator: random resized crop + flip, colour jitter, grayscale, blur,
    Gaussian noise; each with its own probability. Parameters per (seed, view), the same for
    every example (``shared``, the default), or per (seed, id, view)."""

    seed: int = 0
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    noise_std: float = 0.0
    # True (the default for attribution): every example gets the same K transforms (parameters
    # from (seed, view) only). The loss is then a function of the content alone, exact
    # duplicates get identical features (normalised influence 1), and comparisons between
    # examples share their random draws (common random numbers: less noise in influence
    # differences). False: per-example draws from (seed, id, view), as SSL training wants;
    # copies then differ by their views (measured 0.85-0.96 instead of 1, so a duplicate
    # threshold of 0.9 can miss them).
    shared: bool = True

    @classmethod
    def light(cls, seed: int = 0) -> SSLAugment:
        """Milder views for tiny images (e.g. 8x8 digits): crops keep >= 60% of the area."""
        return cls(
            seed=seed,
            crop_scale=(0.6, 1.0),
            flip_p=0.0,
            jitter_p=0.8,
            brightness=0.3,
            contrast=0.3,
            saturation=0.0,
            hue=0.0,
            gray_p=0.0,
            blur_p=0.3,
            blur_sigma=(0.1, 0.8),
            noise_std=0.02,
        )

    def config(self) -> dict:
        """Everything that determines the views (part of a store's fingerprint)."""
        return {"kind": "SSLAugment", **asdict(self)}

    def __post_init__(self) -> None:
        def check(ok: bool, field: str, what: str) -> None:
            if not ok:
                raise ValueError(f"SSLAugment.{field} must be {what}, got {getattr(self, field)!r}")

        lo, hi = self.crop_scale
        check(0 < lo <= hi <= 1, "crop_scale", "(lo, hi) with 0 < lo <= hi <= 1")
        lo, hi = self.crop_ratio
        check(0 < lo <= hi, "crop_ratio", "(lo, hi) with 0 < lo <= hi")
        lo, hi = self.blur_sigma
        check(0 < lo <= hi, "blur_sigma", "(lo, hi) with 0 < lo <= hi")
        for field in ("flip_p", "jitter_p", "gray_p", "blur_p", "brightness", "contrast",
                      "saturation"):
            check(0 <= getattr(self, field) <= 1, field, "in [0, 1]")
        check(0 <= self.hue <= 0.5, "hue", "in [0, 0.5]")
        check(self.noise_std >= 0, "noise_std", ">= 0")

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, view: int) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be an image batch [B, C, H, W], got {shape}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a float image batch, got {x.dtype}: scale integer "
                            "images to floats first, e.g. x.float() / 255")
        if len(ids) != x.shape[0]:
            raise ValueError(f"ids has {len(ids)} entries but x has batch size {x.shape[0]}")
        if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
            # (the CPU has no half grid_sample; on a GPU half images keep their own path, so
            # stores made there stay reproducible)
            return self(x.float(), ids, view).to(x.dtype)
        draw_ids = torch.zeros(len(ids), dtype=torch.int64) if self.shared else ids
        u = torch.from_numpy(view_uniforms(self.seed, draw_ids, view)).to(x.device, torch.float32)
        out = self._crop_flip(x, u)
        out = self._colour(out, u) if x.shape[1] == 3 else self._intensity(out, u)
        out = self._blur(out, u)
        if self.noise_std > 0:
            out = out + self.noise_std * seeded_normal(out, u[:, _U_NOISE_SEED])
        return out

    # -- geometry -----------------------------------------------------------------------------
    def _crop_flip(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        lo, hi = self.crop_scale
        area = lo + (hi - lo) * u[:, _U_CROP_AREA]
        log_r = (
            math.log(self.crop_ratio[0])
            + (math.log(self.crop_ratio[1]) - math.log(self.crop_ratio[0])) * u[:, _U_CROP_RATIO]
        )
        r = torch.exp(log_r)
        # Crop width/height as fractions of the image, clamped to fit.
        w = torch.sqrt(area * r).clamp(max=1.0)
        h = torch.sqrt(area / r).clamp(max=1.0)
        cx = (1 - w) * (2 * u[:, _U_CROP_X] - 1)  # centre in normalised [-1, 1] coordinates
        cy = (1 - h) * (2 * u[:, _U_CROP_Y] - 1)
        flip = torch.where(u[:, _U_FLIP] < self.flip_p, -1.0, 1.0)
        theta = torch.zeros(x.shape[0], 2, 3, dtype=x.dtype, device=x.device)
        theta[:, 0, 0] = (w * flip).to(x.dtype)
        theta[:, 0, 2] = cx.to(x.dtype)
        theta[:, 1, 1] = h.to(x.dtype)
        theta[:, 1, 2] = cy.to(x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(
            x, grid, mode="bilinear", padding_mode="reflection", align_corners=False
        )

    # -- colour -------------------------------------------------------------------------------
    def _colour(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        jitter = (u[:, _U_JITTER_P] < self.jitter_p)[:, None, None, None]
        y = x * _factor(u, x.dtype, _U_BRIGHT, self.brightness)
        mean = _gray(y).mean(dim=(1, 2, 3), keepdim=True)
        y = (y - mean) * _factor(u, x.dtype, _U_CONTRAST, self.contrast) + mean
        g = _gray(y)
        y = (y - g) * _factor(u, x.dtype, _U_SAT, self.saturation) + g
        if self.hue > 0:
            y = _rotate_hue(y, (2 * u[:, _U_HUE] - 1) * self.hue * 2 * math.pi)
        x = torch.where(jitter, y, x)
        gray = (u[:, _U_GRAY] < self.gray_p)[:, None, None, None]
        return torch.where(gray, _gray(x).expand_as(x), x)

    def _intensity(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Brightness and contrast jitter for non-RGB images (saturation and hue need colour)."""
        jitter = (u[:, _U_JITTER_P] < self.jitter_p)[:, None, None, None]
        y = x * _factor(u, x.dtype, _U_BRIGHT, self.brightness)
        mean = y.mean(dim=(1, 2, 3), keepdim=True)
        y = (y - mean) * _factor(u, x.dtype, _U_CONTRAST, self.contrast) + mean
        return torch.where(jitter, y, x)

    # -- blur and noise -----------------------------------------------------------------------
    def _blur(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        if self.blur_p <= 0:
            return x
        B, C, H, W = x.shape
        lo, hi = self.blur_sigma
        sigma = (lo + (hi - lo) * u[:, _U_BLUR_SIGMA]).to(x.dtype)
        # Per-example separable Gaussian blur as two batched matrix products with
        # reflect-padded 1-D blur matrices (much faster than a B*C-group convolution).
        y = torch.einsum("bij,bcjw->bciw", _blur_matrix(sigma, H, hi), x)
        y = torch.einsum("bcij,bkj->bcik", y, _blur_matrix(sigma, W, hi))
        blur = (u[:, _U_BLUR_P] < self.blur_p)[:, None, None, None]
        return torch.where(blur, y, x)



def seeded_normal(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Standard normal noise shaped like ``x [B, ...]``, example b's drawn by a generator seeded
    from its uniform ``u[b]`` (so noise is a pure function of (seed, id, view) like every other
    parameter; drawn on the CPU, where a seeded generator gives the same numbers everywhere)."""
    seeds = (u.double() * 2**53).long().tolist()
    noise = torch.empty(x.shape, dtype=torch.float32)
    for b, s in enumerate(seeds):
        gen = torch.Generator().manual_seed(s)
        # (drawn in float32 whatever x's dtype: torch's float64 stream is another sequence)
        noise[b] = torch.randn(x.shape[1:], generator=gen, dtype=torch.float32)
    return noise.to(x.device, x.dtype)


def _blur_matrix(sigma: torch.Tensor, n: int, max_sigma: float) -> torch.Tensor:
    """``[B, n, n]`` matrices applying a 1-D Gaussian blur (std ``sigma[b]``) with reflect
    boundaries along an axis of length n."""
    radius = max(1, min(int(math.ceil(2 * max_sigma)), n - 1))
    t = torch.arange(-radius, radius + 1, dtype=sigma.dtype, device=sigma.device)
    kern = torch.exp(-(t[None, :] ** 2) / (2 * sigma[:, None] ** 2))
    kern = kern / kern.sum(dim=1, keepdim=True)  # [B, 2r+1]
    i = torch.arange(n, device=sigma.device)[:, None] + t.long()[None, :]  # [n, 2r+1] sources
    i = torch.where(i < 0, -i, i)
    i = torch.where(i >= n, 2 * (n - 1) - i, i)  # reflect (no edge repeat), like F.pad reflect
    m = torch.zeros(sigma.shape[0], n, n, dtype=sigma.dtype, device=sigma.device)
    rows = torch.arange(n, device=sigma.device)[:, None].expand_as(i)
    batch = torch.arange(sigma.shape[0], device=sigma.device)[:, None, None]
    m.index_put_((batch, rows[None], i[None]),
                 kern[:, None, :].expand(-1, n, -1), accumulate=True)
    return m


def _factor(u: torch.Tensor, dtype: torch.dtype, slot: int, strength: float) -> torch.Tensor:
    """Per-example jitter factor ``1 + strength * U(-1, 1)`` from one uniform slot, [B,1,1,1]."""
    return (1 + strength * (2 * u[:, slot] - 1)).to(dtype)[:, None, None, None]


def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, [B, 1, H, W]."""
    w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device)
    return (x * w[None, :, None, None]).sum(dim=1, keepdim=True)


def _rotate_hue(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Hue rotation by ``angle`` radians per example, as a rotation of the chroma plane in YIQ."""
    yiq = torch.tensor(
        [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
        dtype=torch.float64,
    )
    # Inverted on the CPU in float64: on a GPU, inv's error check would sync once per view.
    to_yiq, from_yiq = yiq.to(x), torch.linalg.inv(yiq).to(x)
    c, s = torch.cos(angle).to(x.dtype), torch.sin(angle).to(x.dtype)
    rot = torch.zeros(x.shape[0], 3, 3, dtype=x.dtype, device=x.device)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
    m = from_yiq[None] @ rot @ to_yiq[None]  # [B, 3, 3]
    return torch.einsum("bij,bjhw->bihw", m, x)
