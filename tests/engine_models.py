"""Small models and data shared by the engine tests (and by the resume test's child process)."""

from __future__ import annotations

import issl_fast as issl
import torch
from issl_fast.augment import view_uniforms
from torch import nn


class UniformNoise:
    """Deterministic smooth augmentation for float64 exactness tests: x + 0.1 (u - 1/2)."""

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, view: int) -> torch.Tensor:
        u = torch.from_numpy(view_uniforms(0, ids, view, x[0].numel())).reshape(x.shape)
        return x + 0.1 * (u.to(x.dtype) - 0.5)

    def config(self) -> dict:
        return {"kind": "UniformNoise"}


def tiny_mlp64(seed: int = 0) -> nn.Module:
    """A float64 MLP encoder with a few hundred parameters."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 5)
    ).double()


def small_cnn(seed: int = 0) -> nn.Module:
    """Conv2d + Linear + a non-fused LayerNorm, 3x12x12 inputs."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 5 * 5, 16),
        nn.LayerNorm(16),
        nn.Tanh(),
        nn.Linear(16, 8),
    )


class _TinyViT(nn.Module):
    """Patch conv, one torch TransformerEncoderLayer (nn.MultiheadAttention inside), a head;
    3x12x12 inputs -> 9 tokens of 8 features."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.patch(x).flatten(2).transpose(1, 2)).mean(1))


def tiny_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _TinyViT().eval()


class Signal1d(nn.Module):
    """An audio-style encoder: strided, dilated, grouped, depthwise and every padding mode of
    Conv1d, a shared (twice-called) Conv1d, then a Linear head; [N, 3, 23] inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(3, 6, 5, stride=2, padding=2)
        self.dw = nn.Conv1d(6, 6, 3, groups=6, dilation=2, padding=2,
                                  padding_mode="reflect")
        # (stride 2 leaves one padded sample unused: the exact gradient's correlation overhangs)
        self.grouped = nn.Conv1d(6, 4, 3, groups=2, stride=2, padding=1,
                                       padding_mode="circular", bias=False)
        self.same = nn.Conv1d(4, 4, 4, padding="same", dilation=3, padding_mode="replicate")
        self.shared = nn.Conv1d(4, 4, 1)
        self.valid = nn.Conv1d(4, 5, 2, padding="valid", stride=3)
        self.head = nn.Linear(5, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.dw(torch.tanh(self.stem(x))))
        h = torch.tanh(self.same(torch.tanh(self.grouped(h))))
        h = torch.tanh(self.shared(torch.tanh(self.shared(h))))
        return self.head(torch.tanh(self.valid(h)).mean(2))


class Video3d(nn.Module):
    """A video-style encoder: Conv3d with anisotropic kernels, strides, dilation, reflect and
    'same' padding, a depthwise Conv3d; [N, 2, 5, 7, 6] inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv3d(2, 4, (3, 3, 2), stride=(1, 2, 2), padding=(1, 1, 0))
        self.dw = nn.Conv3d(4, 4, 3, groups=4, stride=(1, 2, 1), padding=1,
                                  padding_mode="reflect")
        self.dilated = nn.Conv3d(4, 3, (2, 3, 2), padding="same", dilation=(1, 2, 1))
        self.head = nn.Linear(3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.dw(torch.tanh(self.stem(x))))
        return self.head(torch.tanh(self.dilated(h)).mean((2, 3, 4)))


class FoldedFrames(nn.Module):
    """A 2-D CNN run on each frame of a clip, the frames folded into the batch
    (``[N * T, C, H, W]`` from ``[N, T, C, H, W]``), then pooled over time; a depthwise
    second convolution; [N, 3, 2, 7, 6] inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(4, 4, 3, groups=4, padding=1, padding_mode="reflect")
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.dw(torch.tanh(self.stem(x.flatten(0, 1)))))
        return self.head(h.mean((2, 3)).unflatten(0, x.shape[:2]).mean(1))


def images(n: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 12, 12, generator=gen)


def cnn_attribution(solver: str = "ekfac", kind: str = "kron", **kw) -> issl.InfluenceSSL:
    proj = issl.Projection(kind, k=64 if kind == "kron" else 256, seed=3)
    loss = issl.AugmentationStability(views=2, seed=5, augment=issl.SSLAugment.light(seed=5))
    return issl.InfluenceSSL(small_cnn(), loss, proj, solver, **kw)


def batches(x: torch.Tensor, size: int) -> list[tuple[torch.Tensor]]:
    return [(x[i : i + size],) for i in range(0, x.shape[0], size)]
