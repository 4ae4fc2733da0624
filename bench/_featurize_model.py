"""The featurize benchmark's model and batch (imported by bench_featurize.py and by the
subprocesses that measure peak memory)."""

from __future__ import annotations

import issl_fast as issl
import torch
from torch import nn

B, VIEWS = 64, 2


def build(threads: int, batch: int = B):
    """~1.08M-parameter CNN for 32x32x3 inputs, the K=2 loss, a batch and its ids (on the CPU;
    the GPU benchmark moves them)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.ReLU(),
        nn.Conv2d(64, 128, 3, padding=1, stride=2), nn.ReLU(),
        nn.Conv2d(128, 128, 3, padding=1, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(128 * 4 * 4, 384), nn.ReLU(), nn.Linear(384, 128)).eval()
    loss = issl.AugmentationStability(views=VIEWS, augment=issl.SSLAugment(seed=1))
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    return model, loss, x, torch.arange(batch)


def baseline_pipeline(model: nn.Module, loss, x, ids, k_total: int, gen: torch.Generator,
                      block: int = 512) -> torch.Tensor:
    """What a PyTorch user writes today: torch.func per-example gradients, then
    ``y = G R / sqrt(k)`` with R a +-1 matrix regenerated in column blocks (TRAK's CPU way).
    Runs where the model and x are; ``gen`` must be a generator of that device."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters()}
    inputs = loss.encoder_inputs(x, ids)
    per_ex = inputs.reshape(loss.groups, x.shape[0], *inputs.shape[1:]).transpose(0, 1)

    def one(p, xin):
        return loss.from_outputs(functional_call(model, p, (xin,)), 1).sum()

    g = vmap(grad(one), in_dims=(None, 0))(params, per_ex)
    G = torch.cat([g[n].reshape(x.shape[0], -1) for n in params], dim=1)  # [B, P]
    out = torch.empty(x.shape[0], k_total, device=G.device)
    for c0 in range(0, k_total, block):
        c1 = min(k_total, c0 + block)
        R = torch.randint(0, 2, (G.shape[1], c1 - c0), generator=gen, device=G.device,
                          dtype=torch.float32).mul_(2).sub_(1)
        out[:, c0:c1] = G @ R
    return out / k_total ** 0.5
