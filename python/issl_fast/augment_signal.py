"""Seeded views of 1-D signals (audio, sensor and other time series) for the label-free loss.

The signal counterpart of :class:`~issl_fast.augment.SSLAugment`, with the usual time-series SSL
transforms (TS-TCC, TS2Vec, wav2vec-style): a random window resized back to the input length
(time shift and stretch), amplitude scaling, polarity inversion, time reversal, a masked span
and Gaussian noise. Every random parameter is a pure function of ``(seed, view)`` (the default,
``shared=True``) or ``(seed, example id, view)`` (``shared=False``;
:func:`~issl_fast.augment.view_uniforms`), so stored features are reproducible and resumable.

Signals are float tensors ``[B, C, L]`` (C channels of L samples); views keep the shape and
dtype (half-precision signals are transformed in float32).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .augment import seeded_normal, view_uniforms

# One fixed uniform slot per parameter (adding a transform never shifts another's draws).
(
    _U_CROP_LENGTH,
    _U_CROP_START,
    _U_SCALE,
    _U_POLARITY,
    _U_REVERSE,
    _U_MASK_P,
    _U_MASK_LENGTH,
    _U_MASK_START,
    _U_NOISE_SEED,
) = range(9)


@dataclass(frozen=True)
class SignalAugment:
    """Views of signals ``[B, C, L]``; parameters per ``(seed, id, view)``.

    crop_scale: fraction of the length a view's window keeps (uniform in the range); the
        window is resampled (linear interpolation) back to L samples: a time shift and stretch.
    scale: amplitude factor range, drawn log-uniformly.
    polarity_p, reverse_p: probabilities of ``-x`` and of time reversal.
    mask_p, mask_fraction: probability of zeroing one span, and the span's length as a
        fraction of L (uniform in the range; SpecAugment-style time masking).
    noise_std: Gaussian noise std as a fraction of each view's root mean square (scale-free:
        the same setting suits raw audio and normalised sensors).
    shared: every example gets the same K transforms (parameters from (seed, view) only; the
        default), as ``SSLAugment``: exact duplicates get identical features. False: per
        (seed, id, view).
    """

    seed: int = 0
    crop_scale: tuple[float, float] = (0.6, 1.0)
    scale: tuple[float, float] = (0.8, 1.25)
    polarity_p: float = 0.0
    reverse_p: float = 0.0
    mask_p: float = 0.5
    mask_fraction: tuple[float, float] = (0.0, 0.1)
    noise_std: float = 0.05
    shared: bool = True

    def __post_init__(self) -> None:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must satisfy 0 < low <= high, got {self.scale}")
        lo, hi = self.mask_fraction
        if not 0 <= lo <= hi < 1:
            raise ValueError(
                f"mask_fraction must satisfy 0 <= low <= high < 1, got {self.mask_fraction}")
        for name in ("polarity_p", "reverse_p", "mask_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got "
                                 f"{getattr(self, name)}")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")

    def config(self) -> dict:
        """Everything that determines the views (part of a store's fingerprint)."""
        return {"kind": "SignalAugment", **asdict(self)}

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, view: int) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.dtype.is_floating_point:
            what = (f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor)
                    else type(x).__name__)
            raise ValueError(f"x must be a float signal batch [B, C, L], got {what}")
        if len(ids) != x.shape[0]:
            raise ValueError(f"ids has {len(ids)} entries but x has batch size {x.shape[0]}")
        if x.dtype in (torch.float16, torch.bfloat16):
            # Resampling positions in half precision would be off by several samples at audio
            # lengths (and the CPU has no half grid_sample): views are made in float32.
            return self(x.float(), ids, view).to(x.dtype)
        draw_ids = torch.zeros(len(ids), dtype=torch.int64) if self.shared else ids
        # (kept on the CPU in float64: the per-example parameters are derived there, moved once)
        u = torch.from_numpy(view_uniforms(self.seed, draw_ids, view))
        out = self._window(x, u)
        log_lo, log_hi = math.log(self.scale[0]), math.log(self.scale[1])
        gain = torch.exp(log_lo + (log_hi - log_lo) * u[:, _U_SCALE])
        gain = torch.where(u[:, _U_POLARITY] < self.polarity_p, -gain, gain)
        out = out * gain.to(x.device, x.dtype)[:, None, None]
        out = self._mask(out, u)
        if self.noise_std > 0:
            rms = out.square().mean(dim=(1, 2), keepdim=True).sqrt()
            out = out + self.noise_std * rms * seeded_normal(out, u[:, _U_NOISE_SEED])
        return out

    def _window(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """A window of ``crop_scale`` of the length at a uniform position, resampled to L and
        reversed with probability ``reverse_p``: one affine map of the time axis per example."""
        lo, hi = self.crop_scale
        width = lo + (hi - lo) * u[:, _U_CROP_LENGTH]
        centre = (1 - width) * (2 * u[:, _U_CROP_START] - 1)  # normalised [-1, 1] coordinates
        sign = torch.where(u[:, _U_REVERSE] < self.reverse_p, -1.0, 1.0).double()
        if bool(((width == 1) & (sign == 1)).all()):
            return x  # (no resampling where every view is the whole signal)
        theta = torch.zeros(x.shape[0], 2, 3, dtype=torch.float64)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1] = width * sign, centre, 1
        theta = theta.to(x.device, x.dtype)
        image = x[:, :, None, :]  # [B, C, 1, L]: grid_sample's 2-D form with one row
        grid = F.affine_grid(theta, list(image.shape), align_corners=False)
        out = F.grid_sample(image, grid, mode="bilinear", padding_mode="border",
                            align_corners=False)
        return out[:, :, 0, :]

    def _mask(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Zeroes one span of ``mask_fraction`` of the length, with probability ``mask_p``."""
        if self.mask_p <= 0 or self.mask_fraction[1] <= 0:
            return x
        L = x.shape[2]
        lo, hi = self.mask_fraction
        length = torch.round((lo + (hi - lo) * u[:, _U_MASK_LENGTH]) * L).long()
        length = torch.where(u[:, _U_MASK_P] < self.mask_p, length, 0)
        start = torch.floor(u[:, _U_MASK_START] * (L - length + 1)).long()
        t = torch.arange(L, device=x.device)[None, :]
        start, stop = start.to(x.device)[:, None], (start + length).to(x.device)[:, None]
        masked = (t >= start) & (t < stop)  # [B, L]
        return x.masked_fill(masked[:, None, :], 0)
