"""Trains the demo's small SSL encoder (SimCLR by default; BYOL and Barlow Twins by flag) with
the project's own seeded augmentations."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..augment import SSLAugment
from ..ssl_losses import BYOL, barlow_twins, nt_xent

METHODS = ("simclr", "byol", "barlow")
FEATURES = 64  # backbone output: the representation whose stability Influence-SSL measures
PROJ = 32


def digits_augment(seed: int, shared: bool = False) -> SSLAugment:
    """Views for the (upsampled) digits: small crops, intensity jitter, mild blur and noise; no
    flips (a mirrored digit is another symbol)."""
    return SSLAugment(seed=seed, crop_scale=(0.7, 1.0), crop_ratio=(0.85, 1.15), flip_p=0.0,
                      jitter_p=0.8, brightness=0.3, contrast=0.3, saturation=0.0, hue=0.0,
                      gray_p=0.0, blur_p=0.3, blur_sigma=(0.1, 0.7), noise_std=0.04,
                      shared=shared)


def make_backbone(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(  # 16x16 -> 8x8 -> 4x4
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, FEATURES),
    )


def train_ssl(
    backbone: nn.Module,
    x: torch.Tensor,
    *,
    method: str = "simclr",
    epochs: int = 40,
    batch_size: int = 256,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[list[float], nn.Module]:
    """Trains ``backbone`` in place on images ``x [n, C, H, W]`` (on the CPU; each batch is moved
    to the backbone's device, where the head is made too); returns the loss per epoch and the
    trained projection head (the space where training enforced invariance)."""
    from tqdm.auto import tqdm

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    torch.manual_seed(seed)
    aug = digits_augment(seed + 1000)
    device = next(backbone.parameters()).device
    head = nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(),
                         nn.Linear(64, PROJ if method != "barlow" else 64)).to(device)
    byol = BYOL(nn.Sequential(backbone, head), PROJ).to(device) if method == "byol" else None
    params = list(backbone.parameters()) + list(head.parameters())
    if byol is not None:
        params += list(byol.predictor.parameters())
    opt = torch.optim.Adam(params, lr=lr, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda e: 0.5 * (1 + math.cos(math.pi * e / max(epochs, 1))))
    gen = torch.Generator().manual_seed(seed)
    n, history = x.shape[0], []
    backbone.train()
    for epoch in tqdm(range(epochs), desc=f"train {method}", disable=not progress):
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(0, n - 1, batch_size):  # drop nothing; a last batch of 1 is skipped
            idx = perm[i:i + batch_size]
            if len(idx) < 2:
                continue
            # Fresh views every epoch, still a pure function of (seed, id, epoch).
            xb = x[idx].to(device)
            v1, v2 = aug(xb, idx, 2 * epoch + 1), aug(xb, idx, 2 * epoch + 2)
            if byol is not None:
                loss = byol.loss(v1, v2)
            else:
                z1, z2 = head(backbone(v1)), head(backbone(v2))
                loss = nt_xent(z1, z2) if method == "simclr" else barlow_twins(z1, z2)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if byol is not None:
                byol.update_target()
            total += loss.item() * len(idx)
        sched.step()
        history.append(total / n)
    backbone.eval()
    log(f"trained {method} for {epochs} epochs: loss {history[0]:.3f} -> {history[-1]:.3f}")
    head.eval()
    return history, head
