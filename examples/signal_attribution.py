"""Influence-SSL for a 1-D convolutional encoder on signals (audio, sensors, time series).

    python examples/signal_attribution.py OUT [--signals 600 (>= 30)] [--epochs 8]

Generates a training set of noisy periodic signals (sines, square waves, chirps) with planted
problems: exact copies of a few signals, copies shifted by a few samples, and a few signals of
pure noise; trains a small Conv1d encoder on it with SimCLR, views from ``issl.SignalAugment``;
then featurises the training set, fits the EK-FAC curvature and asks the attribution object
for duplicate pairs and outliers. Writes OUT/result.json (what was found against what was
planted). Put your own encoder, data and augmentation in their place.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import issl_fast as issl
import numpy as np
import torch
from issl_fast.ssl_losses import nt_xent
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

LENGTH = 256  # samples per signal
COPIES = 6  # exact copies of training signals
SHIFTED = 6  # copies moved by 1-3 samples (circularly)
NOISE = 6  # signals of white noise among the periodic ones
THRESHOLD = 0.99  # normalised influence of a duplicate pair
# Fewest signals: the planted ones, and as many clean signals as there are copies to draw their
# originals from (each copy has its own original).
MIN_SIGNALS = COPIES + SHIFTED + NOISE + COPIES + SHIFTED


def _at_least(minimum: int):
    """An argparse type: an int >= ``minimum`` (a clear parser error, not a crash later)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def make_signals(n: int, seed: int) -> tuple[torch.Tensor, dict[str, list]]:
    """``[n, 1, LENGTH]`` signals; the planted problems sit in the last rows."""
    if n < MIN_SIGNALS:
        raise ValueError(f"n must be at least {MIN_SIGNALS} (the planted signals and their "
                         f"originals), got {n}")
    rng = np.random.default_rng(seed)
    t = np.arange(LENGTH) / LENGTH
    clean = n - COPIES - SHIFTED - NOISE
    rows = []
    for i in range(clean):
        f, phase = rng.uniform(2, 12), rng.uniform(0, 2 * math.pi)
        family = i % 3
        if family == 0:
            s = np.sin(2 * math.pi * f * t + phase)
        elif family == 1:
            s = np.sign(np.sin(2 * math.pi * f * t + phase))
        else:
            s = np.sin(2 * math.pi * (f * t + 6 * t**2) + phase)
        rows.append(s * rng.uniform(0.5, 1.5) + 0.05 * rng.standard_normal(LENGTH))
    originals = rng.choice(clean, COPIES + SHIFTED, replace=False)
    copies = [[int(o), clean + j] for j, o in enumerate(originals[:COPIES])]
    shifted = [[int(o), clean + COPIES + j] for j, o in enumerate(originals[COPIES:])]
    rows += [rows[o] for o, _ in copies]
    rows += [np.roll(rows[o], int(rng.integers(1, 4))) for o, _ in shifted]
    rows += [rng.standard_normal(LENGTH) for _ in range(NOISE)]
    x = torch.tensor(np.stack(rows), dtype=torch.float32)[:, None, :]
    planted = {"copies": copies, "shifted": shifted,
               "noise": list(range(n - NOISE, n))}
    return x, planted


def make_encoder(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv1d(1, 16, 7, stride=2, padding=3), nn.ReLU(),
        nn.Conv1d(16, 32, 5, stride=2, padding=2), nn.ReLU(),
        nn.Conv1d(32, 32, 3, stride=2, padding=1, padding_mode="circular"), nn.ReLU(),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(32, 32))


def train(encoder: nn.Module, x: torch.Tensor, epochs: int, seed: int = 0) -> None:
    """SimCLR: two SignalAugment views per signal, a new draw of views every epoch."""
    opt = torch.optim.Adam(encoder.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    encoder.train()
    for epoch in range(epochs):
        # (per-example draws for training: shared=False)
        augment = issl.SignalAugment(seed=seed + epoch, shared=False)
        for batch in torch.randperm(x.shape[0], generator=gen).split(128):
            loss = nt_xent(encoder(augment(x[batch], batch, 1)),
                           encoder(augment(x[batch], batch, 2)))
            opt.zero_grad()
            loss.backward()
            opt.step()
    encoder.eval()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory for the store and result.json")
    parser.add_argument("--signals", type=_at_least(MIN_SIGNALS), default=600,
                        help=f"signals in the training set (at least {MIN_SIGNALS}; default 600)")
    parser.add_argument("--epochs", type=_at_least(0), default=8,
                        help="SimCLR training epochs (0: random weights; default 8)")
    args = parser.parse_args(argv)

    x, planted = make_signals(args.signals, seed=0)
    encoder = make_encoder()
    train(encoder, x, args.epochs)
    # Shared views (every signal gets the same K transforms): exact copies get identical
    # features, and signals are compared under common random draws.
    attr = issl.InfluenceSSL(
        encoder,
        loss=issl.AugmentationStability(views=4, augment=issl.SignalAugment(seed=0, shared=True)),
        projection=issl.Projection("kron", k=256), solver="ekfac")
    store = attr.featurize(DataLoader(TensorDataset(x), batch_size=64), args.out / "store",
                           progress=False)
    attr.fit(store)
    # (gradient features of a strided conv net are not shift-invariant: each signal is also
    # compared shifted by up to 3 samples, the way the copies were made)
    loader = DataLoader(TensorDataset(x), batch_size=64)
    dups = attr.find_duplicates(threshold=THRESHOLD, data=loader,
                                transforms=issl.apps.shifts(3, circular=True))
    found = {tuple(sorted(map(int, pair))) for pair in dups.ids}
    outliers = attr.find_outliers("neighbours", k=3)
    worst = [int(i) for i in outliers.ids[:2 * NOISE]]  # (ids: dataset indices here)
    result = {
        "pairs_found": len(found),
        "copies_found": sum(tuple(sorted(p)) in found for p in planted["copies"]),
        "shifted_found": sum(tuple(sorted(p)) in found for p in planted["shifted"]),
        "noise_in_top_outliers": sum(i in worst for i in planted["noise"]),
        "planted": planted,
        "top_outliers": worst,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=1))
    print(f"exact copies found {result['copies_found']}/{COPIES}, shifted copies "
          f"{result['shifted_found']}/{SHIFTED} ({len(found)} pairs above {THRESHOLD}); noise "
          f"signals among the {2 * NOISE} top outliers: {result['noise_in_top_outliers']}/{NOISE}")
    return result


if __name__ == "__main__":
    main()
