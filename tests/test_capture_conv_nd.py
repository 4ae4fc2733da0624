"""Conv1d and Conv3d layers are fused like Conv2d: their features equal torch.func per-example
gradients (float64 truth) through every capture path (identity: the patches' factors; dense:
sketch_linear; kron: the convolution by P_in; grouped: the exact gradient), with every padding
form, stride, dilation and group count, and an EK-FAC fit uses their Kronecker statistics."""

from __future__ import annotations

import issl_fast as issl
import pytest
import torch
from engine_models import Signal1d, Video3d, batches
from issl_fast.augment import view_uniforms
from issl_fast.capture import build_layout
from issl_fast.featurize import Featurizer
from test_capture import (
    SKETCH_RTOL,
    _assert_identity_exact,
    _assert_kron_blocks_match,
)


class _Noise:
    """Seeded views ``x + 0.5 (u - 1/2)`` of any shape: far enough from the anchor that the
    example's gradient (anchor + views) is not mostly cancellation, which float32 paths see."""

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, view: int) -> torch.Tensor:
        u = torch.from_numpy(view_uniforms(1, ids, view, x[0].numel())).reshape(x.shape)
        return x + 0.5 * (u.to(x.dtype) - 0.5)

    def config(self) -> dict:
        return {"kind": "Noise", "scale": 0.5}


CASES = {
    "conv1d": (Signal1d, (3, 23), ["conv1d"] * 6 + ["linear"], [1, 6, 2, 1, 1, 1, 1]),
    "conv3d": (Video3d, (2, 5, 7, 6), ["conv3d"] * 3 + ["linear"], [1, 4, 1, 1]),
}


@pytest.mark.filterwarnings("ignore:Using padding='same'")  # torch: an even kernel pads a copy
@pytest.mark.parametrize("case", sorted(CASES))
def test_nd_convolutions_are_fused_and_exact(case: str) -> None:
    make, shape, kinds, groups = CASES[case]
    torch.manual_seed(4)
    model = make().double()  # float64 truth: the sketches' own float32 error is what is left
    layout = build_layout(model)
    assert [layer.kind for layer in layout.layers] == kinds
    assert [layer.groups for layer in layout.layers] == groups
    assert not layout.fallback and layout.total == sum(p.numel() for p in model.parameters())
    loss = issl.AugmentationStability(views=2, seed=3, augment=_Noise())
    x, ids = torch.rand(4, *shape, dtype=torch.float64), torch.arange(4)
    brute = _assert_identity_exact(model, layout, loss, x, ids).float()
    proj = issl.Projection("dense", k=160, seed=5)
    phi, _ = Featurizer(model, layout, loss, proj)(x, ids)
    want = issl.sketch_dense(brute.contiguous(), 160, seed=5)
    assert ((phi - want).abs().max() / want.abs().max()).item() < SKETCH_RTOL
    _assert_kron_blocks_match(model, layout, loss, x, ids, brute)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_nd_convolutions_fit_ekfac_and_score(tmp_path) -> None:
    # Ungrouped 1-D/3-D convolutions get EK-FAC blocks from their Kronecker statistics, grouped
    # ones Gauss-Newton blocks; an example's score against its own row is its self-influence.
    torch.manual_seed(2)
    loss = issl.AugmentationStability(views=2, augment=issl.SignalAugment(seed=3))
    attr = issl.InfluenceSSL(Signal1d(), loss, issl.Projection("kron", k=9, seed=2), "ekfac",
                             store_dtype="float32")  # (scores of fresh features vs stored)
    kinds = {b.name: b.kind for b in attr.featurizer.blocks}
    assert kinds["stem"] == kinds["shared"] == "kron" and kinds["dw"] == "kron_grouped"
    x = torch.rand(12, 3, 23)
    store = attr.featurize(batches(x, 5), tmp_path / "s", progress=False)
    assert "stem/A" in store.stats() and "dw/A" not in store.stats()
    attr.fit(store)
    parts = {b.name: type(p).__name__ for b, p in attr.solver._parts}
    assert parts["stem"] == parts["valid"] == "_EKFACBlock" and parts["dw"] == "_CholeskyBlock"
    s = attr.self_influence()
    assert (s > 0).all()
    top = attr.score(x[:3], topk=12, ids=torch.arange(3))  # every row, best first
    own = top.values[top.ids == torch.arange(3)[:, None]]
    torch.testing.assert_close(own, torch.from_numpy(s[:3]).float(), rtol=2e-3, atol=0)


def test_unbatched_convolution_inputs_are_an_error() -> None:
    class Unbatched(torch.nn.Module):  # calls its Conv1d one example at a time
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv1d(2, 3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.stack([self.conv(row).mean(1) for row in x])

    model = Unbatched()
    loss = issl.AugmentationStability(views=1, augment=_Noise())
    with pytest.raises(ValueError, match=r"'conv' got an input of shape \(2, 7\)"):
        Featurizer(model, build_layout(model), loss, issl.Projection("identity"))(
            torch.rand(3, 2, 7), torch.arange(3))
