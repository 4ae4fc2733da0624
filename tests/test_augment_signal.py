"""SignalAugment: views of [B, C, L] signals are pure functions of (seed, id, view), keep the
shape, do what each parameter says, and refuse bad settings and inputs by name."""

from __future__ import annotations

import issl_fast as issl
import pytest
import torch

# every transform off, views drawn per example (so that draws vary across a batch)
OFF = dict(crop_scale=(1.0, 1.0), scale=(1.0, 1.0), mask_p=0.0, noise_std=0.0, shared=False)


def _signals(b: int = 6, c: int = 2, n: int = 37, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, c, n, generator=torch.Generator().manual_seed(seed))


def test_views_depend_only_on_seed_id_and_view() -> None:
    aug = issl.SignalAugment(seed=3, polarity_p=0.5, reverse_p=0.5, shared=False)
    x, ids = _signals(), torch.tensor([5, 0, 9, 2, 7, 1])
    whole = aug(x, ids, 1)
    assert whole.shape == x.shape and whole.dtype == x.dtype
    # the same example in another batch, position and company gets the same view
    perm = torch.tensor([3, 5, 0])
    torch.testing.assert_close(aug(x[perm], ids[perm], 1), whole[perm], rtol=0, atol=0)
    assert not torch.allclose(aug(x, ids, 2), whole)  # another view
    assert not torch.allclose(issl.SignalAugment(seed=4, shared=False)(x, ids, 1),
                              whole)  # another seed
    # shared: identical signals get identical views whatever their ids
    shared = issl.SignalAugment(seed=3, shared=True)
    same = x[:1].expand(3, -1, -1)
    views = shared(same, torch.tensor([0, 11, 40]), 1)
    torch.testing.assert_close(views[1:], views[:1].expand(2, -1, -1), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_signals_are_transformed_in_float32(dtype: torch.dtype) -> None:
    aug = issl.SignalAugment(seed=1, mask_p=1.0, reverse_p=0.5, polarity_p=0.5)
    x, ids = _signals(n=1000), torch.arange(6)
    half = aug(x.to(dtype), ids, 2)
    assert half.dtype == dtype and half.shape == x.shape
    # the float32 view of the rounded signal, rounded: resampled at the same positions
    torch.testing.assert_close(half, aug(x.to(dtype).float(), ids, 2).to(dtype), rtol=0, atol=0)


def test_all_transforms_off_is_the_identity_and_float64_works() -> None:
    x = _signals().double()
    out = issl.SignalAugment(**OFF)(x, torch.arange(6), 1)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, x, rtol=0, atol=0)


def test_each_transform_does_what_it_says() -> None:
    x, ids = _signals(n=40), torch.arange(6)
    # polarity and reversal with probability 1; amplitude in its log-uniform range
    assert torch.equal(issl.SignalAugment(**{**OFF, "polarity_p": 1.0})(x, ids, 1), -x)
    torch.testing.assert_close(issl.SignalAugment(**{**OFF, "reverse_p": 1.0})(x, ids, 1),
                               x.flip(2), rtol=1e-6, atol=1e-6)
    gain = issl.SignalAugment(**{**OFF, "scale": (0.5, 2.0)})(x, ids, 1) / x
    g = gain[:, 0, 0]
    torch.testing.assert_close(gain, g[:, None, None].expand_as(gain))
    assert ((g >= 0.5) & (g <= 2.0)).all() and g.std() > 0
    # a window of half the signal, stretched to the whole length: a linear ramp stays a ramp
    # (of half the slope) and stays within the original's range
    ramp = torch.linspace(0, 1, 40).expand(6, 1, 40).contiguous()
    half = issl.SignalAugment(**{**OFF, "crop_scale": (0.5, 0.5)})(ramp, ids, 1)
    slope = half.diff(dim=2)[:, :, 1:-1]
    torch.testing.assert_close(slope, torch.full_like(slope, 0.5 / 39), rtol=1e-4, atol=1e-6)
    assert half.min() >= 0 and half.max() <= 1 and half[:, 0, 0].std() > 0  # varied positions
    # one zeroed span per masked example, of 20-30% of the length
    masked = issl.SignalAugment(**{**OFF, "mask_p": 1.0, "mask_fraction": (0.2, 0.3)})(
        x + 10, ids, 1)
    zeros = (masked == 0).all(dim=1)  # [B, L]
    lengths = zeros.sum(1)
    assert ((lengths >= 8) & (lengths <= 12)).all()
    first = zeros.float().argmax(1)
    for b in range(6):  # contiguous
        assert zeros[b, first[b]:first[b] + lengths[b]].all()
    # noise relative to the signal's RMS: the same relative size at any amplitude
    noisy = issl.SignalAugment(**{**OFF, "noise_std": 0.1})
    for amplitude in (1e-3, 1e3):
        rel = (noisy(amplitude * x, ids, 1) - amplitude * x).std() / (amplitude * x).std()
        assert 0.08 < rel.item() < 0.12


@pytest.mark.parametrize("field, value", [
    ("crop_scale", (0.0, 1.0)), ("crop_scale", (0.9, 0.5)), ("crop_scale", (0.5, 1.5)),
    ("scale", (0.0, 1.0)), ("mask_fraction", (0.0, 1.0)), ("polarity_p", 1.5),
    ("reverse_p", -0.1), ("mask_p", 2.0), ("noise_std", -1.0)])
def test_bad_settings_are_refused_by_name(field: str, value) -> None:
    with pytest.raises(ValueError, match=field):
        issl.SignalAugment(**{field: value})


def test_bad_inputs_are_refused_with_their_shape() -> None:
    aug = issl.SignalAugment()
    with pytest.raises(ValueError, match=r"\[B, C, L\], got \(4, 9\)"):
        aug(torch.rand(4, 9), torch.arange(4), 1)
    with pytest.raises(ValueError, match="torch.int64"):
        aug(torch.ones(4, 1, 9, dtype=torch.int64), torch.arange(4), 1)
    with pytest.raises(ValueError, match="3 entries but x has batch size 4"):
        aug(torch.rand(4, 1, 9), torch.arange(3), 1)


def test_config_names_every_setting() -> None:
    # (the store fingerprint: another setting must be another store)
    a, b = issl.SignalAugment(seed=1), issl.SignalAugment(seed=1, mask_p=0.2)
    assert a.config()["kind"] == "SignalAugment" and a.config() != b.config()
    assert set(a.config()) - {"kind"} == set(a.__dataclass_fields__)
