"""The demo's data: scikit-learn's digits (1,797 8x8 grey images, shipped inside the package),
upsampled to 16x16, with known problems planted in the training split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..apps.transforms import Translation

# Planted near-duplicates: Gaussian pixel noise of this std (images are in [0, 1]) or a 1-pixel
# shift; both leave the digit obviously the same to a person.
NEAR_DUP_NOISE = 0.03
# Outliers: images from outside the digit distribution.
OUTLIER_KINDS = ("inverted", "noise", "blob")
# Working resolution: the 8x8 digits are upsampled (bilinear) so that a 1-pixel shift is the
# small perturbation a near-duplicate should be (at 8x8 it moves a stroke by 12% of the image).
SIZE = 16
# The "faded" group: ink scaled down to this fraction (a brightness shift on a subset).
FADE = 0.45


@dataclass
class DemoData:
    """Training split with planted problems, and a clean test split (16x16 images: the 8x8
    digits upsampled, see ``SIZE``).

    ``train_kind``: "clean", "exact_dup", "near_dup" or "outlier" per training row;
    ``dup_pairs``: [p, 2] rows (original, planted copy); ``groups``: "thin" / "thick" / "faded".
    """

    train_x: torch.Tensor  # [n, 1, SIZE, SIZE] (16x16) float32 in [0, 1]
    train_labels: np.ndarray  # digit class, -1 for outliers
    train_kind: np.ndarray
    train_groups: np.ndarray
    outlier_kind: np.ndarray  # "inverted" / "noise" / "blob" for outliers, "" otherwise
    dup_pairs: np.ndarray
    dup_kind: np.ndarray  # per pair: "exact", "noise" (pixel noise) or "shift" (1-pixel shift)
    test_x: torch.Tensor  # [n_test, 1, SIZE, SIZE]
    test_labels: np.ndarray
    test_groups: np.ndarray

    @property
    def outlier_rows(self) -> np.ndarray:
        return np.flatnonzero(self.train_kind == "outlier")


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - the demo extra installs it
        raise ImportError("the demo needs scikit-learn: pip install 'issl_fast[demo]'") from exc
    import torch.nn.functional as F

    d = load_digits()
    x = torch.from_numpy((d.images / 16.0).astype(np.float32))[:, None]
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return x[:, 0].clamp(0, 1).numpy(), d.target.astype(np.int64)


def _thickness_groups(x: np.ndarray, cut: float) -> np.ndarray:
    ink = x.reshape(len(x), -1).mean(axis=1)
    return np.where(ink > cut, "thick", "thin")


def load_demo_data(
    seed: int = 0,
    n_test: int = 297,
    n_train: int | None = None,
    n_exact: int = 20,
    n_near: int = 20,
    n_outliers: int = 30,
    faded_fraction: float = 0.15,
) -> DemoData:
    """Split digits into train/test, then plant exact and near duplicates, outliers and a faded
    group in the training split (and fade the same fraction of the test split)."""
    rng = np.random.default_rng(seed)
    images, labels = _load_digits()
    order = rng.permutation(len(images))
    images, labels = images[order], labels[order]
    test_x, test_y = images[:n_test], labels[:n_test]
    train_x, train_y = images[n_test:], labels[n_test:]
    if n_train is not None:
        train_x, train_y = train_x[:n_train], train_y[:n_train]
    n = len(train_x)

    cut = float(np.median(train_x.reshape(n, -1).mean(axis=1)))
    train_groups = _thickness_groups(train_x, cut)
    test_groups = _thickness_groups(test_x, cut)
    for x, g in ((train_x, train_groups), (test_x, test_groups)):
        faded = rng.choice(len(x), int(round(faded_fraction * len(x))), replace=False)
        x[faded] *= FADE
        g[faded] = "faded"

    src = rng.choice(n, n_exact + n_near, replace=False)
    extra_x, extra_y, extra_kind, extra_g, extra_ok, pairs, pair_kind = [], [], [], [], [], [], []
    for j, s in enumerate(src):
        img = train_x[s].copy()
        pair_kind.append("exact" if j < n_exact else ("noise" if j % 2 else "shift"))
        if j >= n_exact:
            if j % 2:
                noisy = img + rng.normal(0, NEAR_DUP_NOISE, img.shape)
                img = np.clip(noisy, 0, 1).astype(np.float32)
            else:
                d = 1 if rng.random() < 0.5 else -1
                dy, dx = (d, 0) if rng.random() < 0.5 else (0, d)
                # Moved by one pixel; the uncovered edge is blank (nothing wraps around).
                img = Translation(dy, dx)(torch.from_numpy(img)).numpy()
        extra_x.append(img)
        extra_y.append(train_y[s])
        extra_kind.append("exact_dup" if j < n_exact else "near_dup")
        extra_g.append(train_groups[s])
        extra_ok.append("")
        pairs.append((s, n + j))
    for j in range(n_outliers):
        kind = OUTLIER_KINDS[j % len(OUTLIER_KINDS)]
        if kind == "inverted":
            img = 1.0 - train_x[rng.integers(n)]
        elif kind == "noise":
            img = rng.random((SIZE, SIZE))
        else:
            yy, xx = np.mgrid[0:SIZE, 0:SIZE]
            cy, cx = rng.uniform(2, SIZE - 3, size=2)
            r = rng.uniform(SIZE / 8, SIZE / 3)
            img = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        extra_x.append(img.astype(np.float32))
        extra_y.append(-1)
        extra_kind.append("outlier")
        extra_g.append("thick" if img.mean() > cut else "thin")
        extra_ok.append(kind)

    all_x = np.concatenate([train_x, np.stack(extra_x)])
    all_y = np.concatenate([train_y, extra_y])
    kinds = np.concatenate([np.full(n, "clean", dtype=object), extra_kind]).astype(str)
    groups = np.concatenate([train_groups, extra_g]).astype(str)
    okind = np.concatenate([np.full(n, "", dtype=object), extra_ok]).astype(str)
    # Shuffle so planted rows are not a block at the end; remap the duplicate pairs.
    perm = rng.permutation(len(all_x))
    where = np.empty_like(perm)
    where[perm] = np.arange(len(perm))
    dup_pairs = np.sort(where[np.array(pairs)], axis=1)
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a))[:, None]  # noqa: E731
    return DemoData(to_t(all_x[perm]), all_y[perm], kinds[perm], groups[perm], okind[perm],
                    dup_pairs, np.array(pair_kind),
                    to_t(test_x), test_y, test_groups.astype(str))
