"""Seeded augmentations: a view is a pure function of (seed, view), or of (seed, example id,
view) with shared=False."""

from __future__ import annotations

import dataclasses

import issl_fast as issl
import numpy as np
import pytest
import torch
from issl_fast.augment import view_uniforms


def _imgs(n: int, c: int = 3, hw: int = 16) -> torch.Tensor:
    return torch.rand(n, c, hw, hw, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "aug",
    [issl.SSLAugment(seed=3, noise_std=0.05), issl.SSLAugment.light(seed=3),
     issl.SSLAugment(seed=3, noise_std=0.05, shared=False),
     dataclasses.replace(issl.SSLAugment.light(seed=3), shared=False)],
    ids=["full", "light", "full-per-example", "light-per-example"],
)
def test_views_independent_of_batch_composition_and_order(aug) -> None:
    x, ids = _imgs(9), torch.tensor([5, 0, 17, 3, 2**40, 8, 9, 1, 4])
    whole = aug(x, ids, view=2)
    perm = torch.tensor([8, 2, 0, 5, 1, 7, 3, 6, 4])
    shuffled = aug(x[perm], ids[perm], view=2)
    torch.testing.assert_close(shuffled, whole[perm], rtol=0, atol=1e-6)
    single = torch.cat([aug(x[i : i + 1], ids[i : i + 1], view=2) for i in range(9)])
    torch.testing.assert_close(single, whole, rtol=0, atol=1e-6)
    assert whole.shape == x.shape


def test_views_differ_by_view_id_and_seed() -> None:
    x, ids = _imgs(6), torch.arange(6)
    aug = issl.SSLAugment(seed=1, shared=False)
    v1, v2 = aug(x, ids, 1), aug(x, ids, 2)
    assert (v1 - v2).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    other_seed = issl.SSLAugment(seed=2, shared=False)(x, ids, 1)
    assert (v1 - other_seed).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    same_img = x[:1].expand(6, -1, -1, -1)
    per_id = aug(same_img, ids, 1)  # one image, six ids -> six different views
    assert (per_id[0] - per_id[1:]).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    # the default: views shared by every example (one image, six ids -> one view), still
    # different by view and seed
    shared = issl.SSLAugment(seed=1)
    assert torch.equal(shared(same_img, ids, 1), shared(same_img[:1], ids[:1], 1).expand(6, -1,
                                                                                       -1, -1))
    assert (shared(x, ids, 1) - shared(x, ids, 2)).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    assert (shared(x, ids, 1) - issl.SSLAugment(seed=2)(x, ids, 1)).abs().amax(
        dim=(1, 2, 3)).min() > 1e-3


def test_uniforms_are_uniform_and_pinned() -> None:
    u = view_uniforms(0, np.arange(20000), 1, 4)
    assert u.shape == (20000, 4) and (u >= 0).all() and (u < 1).all()
    # mean and variance of U(0,1) within ~6 standard errors
    assert abs(u.mean() - 0.5) < 6 * np.sqrt(1 / 12 / u.size)
    assert abs(u.var() - 1 / 12) < 0.003
    assert np.array_equal(view_uniforms(0, [7], 3, 4), view_uniforms(0, [7], 3, 4))


def test_grayscale_and_single_channel_inputs() -> None:
    gray = torch.rand(4, 1, 10, 10)
    out = issl.SSLAugment(seed=0, gray_p=1.0)(gray, torch.arange(4), 1)
    assert out.shape == gray.shape  # grayscale/saturation/hue need C = 3
    # brightness-only views of a 1-channel image are scalar multiples of the input
    bright = issl.SSLAugment(seed=0, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0,
                             jitter_p=1.0, contrast=0.0, blur_p=0.0)(gray, torch.arange(4), 1)
    factor = bright.sum(dim=(1, 2, 3)) / gray.sum(dim=(1, 2, 3))
    torch.testing.assert_close(bright, gray * factor[:, None, None, None], rtol=0, atol=1e-5)
    assert (factor - 1).abs().max() > 1e-3
    rgb = _imgs(4)
    g = issl.SSLAugment(seed=0, gray_p=1.0, jitter_p=0.0, blur_p=0.0)(rgb, torch.arange(4), 1)
    torch.testing.assert_close(g[:, 0], g[:, 1])
    torch.testing.assert_close(g[:, 1], g[:, 2])


def test_bad_inputs() -> None:
    aug = issl.SSLAugment()
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        aug(torch.rand(3, 8, 8), torch.arange(3), 1)
    with pytest.raises(ValueError, match="ids has 2 entries"):
        aug(torch.rand(3, 3, 8, 8), torch.arange(2), 1)
    with pytest.raises(ValueError, match="ids must be >= 0"):
        view_uniforms(0, [-1], 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_images_on_the_cpu_are_augmented_in_float32(dtype: torch.dtype) -> None:
    # (torch has no half grid_sample on the CPU: a crash before)
    aug, x, ids = issl.SSLAugment(seed=2, noise_std=0.05), _imgs(3).to(dtype), torch.arange(3)
    out = aug(x, ids, 1)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, aug(x.float(), ids, 1).to(dtype), rtol=0, atol=0)


def test_noise_is_the_same_draw_in_every_dtype() -> None:
    # (torch's float64 normal stream is another sequence than float32's: drawn in float32)
    aug = issl.SSLAugment(seed=2, noise_std=0.05)
    x = torch.rand(3, 3, 12, 12)
    ids = torch.tensor([4, 9, 1])
    torch.testing.assert_close(aug(x.double(), ids, 1).float(), aug(x, ids, 1), rtol=0,
                               atol=1e-5)


def test_ids_and_views_beyond_the_counter_are_refused() -> None:
    aug = issl.SSLAugment(seed=0, shared=False)
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"ids must be < 2\*\*48"):
        aug(x, torch.tensor([3, 2**48 + 3]), 0)
    # shared views do not draw from the ids: any id gives the same views
    shared = issl.SSLAugment(seed=0)
    assert torch.equal(shared(x, torch.tensor([3, 2**48 + 3]), 5), shared(x, torch.arange(2), 5))
    with pytest.raises(ValueError, match=r"view must be in \[0, 2\*\*16\)"):
        aug(x, torch.tensor([0, 1]), 2**16)
    assert aug(x, torch.tensor([0, 2**48 - 1]), 2**16 - 1).shape == x.shape


def test_integer_images_and_impossible_settings_are_named() -> None:
    with pytest.raises(TypeError, match=r"float image batch, got torch.uint8.*x.float\(\) / 255"):
        issl.SSLAugment()(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.arange(2), 0)
    for bad, field in (({"blur_sigma": (0.0, 0.0)}, "blur_sigma"),
                       ({"crop_scale": (0.9, 0.5)}, "crop_scale"),
                       ({"crop_ratio": (0.0, 1.0)}, "crop_ratio"),
                       ({"brightness": 1.5}, "brightness"), ({"flip_p": 2.0}, "flip_p"),
                       ({"hue": 0.7}, "hue"), ({"noise_std": -1.0}, "noise_std")):
        with pytest.raises(ValueError, match=f"SSLAugment.{field} must be"):
            issl.SSLAugment(**bad)
    issl.SSLAugment.light()  # the presets are valid


def test_a_sequence_first_representation_is_an_error_not_mixed_examples() -> None:
    loss = issl.AugmentationStability(views=2, augment=issl.SSLAugment.light(seed=0))

    class SeqFirst(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, N, d]
            return x.flatten(2).transpose(0, 1)[:, :, :4].contiguous()

    x = torch.rand(4, 5, 8, 8)  # (5 "tokens" as channels)
    with pytest.raises(ValueError, match=r"batch first, 12 rows \(3 views x 4 examples\), got "
                                         r"shape \(5, 12, 4\)"):
        loss(SeqFirst(), x, torch.arange(4))
    fixed = issl.AugmentationStability(views=2, augment=issl.SSLAugment.light(seed=0),
                                       representation=lambda out: out.transpose(0, 1))
    assert fixed(SeqFirst(), x, torch.arange(4)).shape == (4,)
