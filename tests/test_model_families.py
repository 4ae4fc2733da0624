"""Encoders as people build them, beyond the engine's test models: BatchNorm ResNets (0-dim
buffers in the fingerprint), weights tied between modules, blocks named in track=, modules
torch.func.vmap cannot batch (a GRU), a squeeze() in the encoder, a clip's frames folded into
a convolution's batch. Features are compared with per-example gradients taken by plain autograd,
one example at a time, in float64."""

from __future__ import annotations

import hashlib
import warnings

import issl_fast as issl
import numpy as np
import pytest
import torch
from issl_fast.capture import build_layout
from issl_fast.featurize import Featurizer
from issl_fast.influence import model_fingerprint
from issl_fast.store import StoreError
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class _Noise:
    """Seeded views of any shape (a pure function of the view number)."""

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, view: int) -> torch.Tensor:
        return x + 0.1 * (view + 1) * torch.cos(7 * x + view)

    def config(self) -> dict:
        return {"kind": "Noise"}


def _loss(views: int = 2) -> issl.AugmentationStability:
    return issl.AugmentationStability(views=views, augment=_Noise())


def _truth(model: nn.Module, layout, loss, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per-example flat gradients in the layout's order, by autograd, one example at a time."""
    inputs = loss.encoder_inputs(x, ids)
    b = x.shape[0]
    per_ex = inputs.reshape(loss.groups, b, *inputs.shape[1:]).transpose(0, 1)
    params: list[torch.Tensor] = []
    for layer in layout.layers:
        params.append(getattr(layer.module, layer.weight_attr))
        if layer.has_bias:
            params.append(layer.module.bias)
    params += [fb.param for fb in layout.fallback]
    rows = []
    for i in range(b):
        grads = iter(torch.autograd.grad(loss.from_outputs(model(per_ex[i]), 1).sum(), params))
        parts = []
        for layer in layout.layers:
            g = next(grads).reshape(layer.d_out, -1)
            if layer.has_bias:
                g = torch.cat([g, next(grads)[:, None]], dim=1)
            parts.append(g.reshape(-1))
        parts += [next(grads).reshape(-1) for _ in layout.fallback]
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def _assert_exact(model: nn.Module, x: torch.Tensor, views: int = 2, track=None) -> None:
    layout = build_layout(model, track)
    loss, ids = _loss(views), torch.arange(x.shape[0])
    phi, _ = Featurizer(model, layout, loss, issl.Projection("identity"))(x, ids)
    torch.testing.assert_close(phi, _truth(model, layout, loss, x, ids), rtol=1e-9, atol=1e-12)


class _ResNet(nn.Module):
    """A residual stage with BatchNorm, a strided 1x1 shortcut, a BatchNorm1d projector and a
    learned temperature (a 0-dim parameter)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4),
                                  nn.ReLU())
        self.conv = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1))
        self.short = nn.Sequential(nn.Conv2d(4, 6, 1, stride=2, bias=False), nn.BatchNorm2d(6))
        self.head = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5))
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = torch.relu(self.conv(h) + self.short(h)).mean((2, 3))
        return self.head(h) * self.scale


def _trained_bn(model: nn.Module) -> nn.Module:
    """Running statistics that are not the defaults (a BatchNorm that has seen data)."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(8, 3, 8, 8, dtype=next(model.parameters()).dtype))
    return model.eval()


def test_a_batchnorm_resnet_is_featurised_exactly_and_through_a_store(tmp_path) -> None:
    torch.manual_seed(0)
    model = _trained_bn(_ResNet().double())
    _assert_exact(model, torch.rand(3, 3, 8, 8, dtype=torch.float64))
    layout = build_layout(model)
    assert [layer.name for layer in layout.layers] == [
        "stem.0", "conv.0", "conv.3", "short.0", "head.0", "head.3"]
    assert not layout.fallback  # (BatchNorm and the temperature need track=)
    # featurize -> fit -> score through a store opened by path (which checks the fingerprint)
    model = _trained_bn(_ResNet())
    attr = issl.InfluenceSSL(model, _loss(), issl.Projection("kron", k=16), "ekfac")
    x = torch.rand(10, 3, 8, 8)
    attr.featurize(DataLoader(TensorDataset(x), batch_size=4), tmp_path / "s", progress=False)
    attr.fit(tmp_path / "s")
    top = attr.score(x[:3], ids=torch.arange(3), topk=1)
    assert top.ids[:, 0].tolist() == [0, 1, 2]  # each example is its own top proponent


def test_the_weights_hash_covers_zero_dim_tensors_and_follows_the_weights(tmp_path) -> None:
    torch.manual_seed(0)
    model = _trained_bn(_ResNet())
    h = hashlib.sha256()  # the definition, written out
    for name, t in model.state_dict().items():
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    assert model_fingerprint(model) == h.hexdigest()
    attr = issl.InfluenceSSL(model, _loss(), issl.Projection("kron", k=16), "block")
    first = attr.fingerprint()["model"]
    assert attr.fingerprint()["model"] == first
    with torch.no_grad():  # a running statistic changes the features: so does the hash
        model.stem[1].running_mean += 0.1
    second = attr.fingerprint()["model"]
    assert second not in (first, model_fingerprint(_trained_bn(_ResNet())))
    assert second == model_fingerprint(model)
    # an optimiser step (in place), then load_state_dict of the old weights
    store = attr.featurize(DataLoader(TensorDataset(torch.rand(6, 3, 8, 8)), batch_size=3),
                           tmp_path / "s", progress=False)
    attr.fit(store)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.rand(2, 3, 8, 8)).sum().backward()
    opt.step()
    for scan in (lambda: attr.score(torch.rand(2, 3, 8, 8), topk=2),
                 lambda: attr.self_influence(), lambda: attr.fit(store)):
        with pytest.raises(StoreError, match="built differently: model"):
            scan()
    model.load_state_dict(saved)
    assert attr.fingerprint()["model"] == second
    assert attr.score(torch.rand(2, 3, 8, 8), topk=2).values.shape == (2, 2)


class _Tied(nn.Module):
    """An encoder/decoder-style pair: b uses a's weight (biases their own), an embedding tied
    to the output Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 6)
        self.a, self.b, self.out = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 7)
        self.b.weight = self.a.weight
        self.out.weight = self.emb.weight
        self.head = nn.Linear(7, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.b(torch.tanh(self.a(x))))
        h = h + self.emb(torch.arange(3)).sum(0)
        return self.head(torch.tanh(self.out(h)))


def test_tied_weights_take_the_gradient_of_every_use() -> None:
    torch.manual_seed(0)
    model = _Tied().double().eval()
    layout = build_layout(model)
    assert [layer.name for layer in layout.layers] == ["head"]  # the tied ones: torch.func
    assert layout.total == sum(p.numel() for p in model.parameters())  # each parameter once
    _assert_exact(model, torch.rand(3, 6, dtype=torch.float64))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(8), nn.Linear(8, 16), nn.Linear(16, 8)
        self.gamma = nn.Parameter(torch.full((8,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * self.fc2(torch.relu(self.fc1(self.norm(x))))


def test_a_block_named_in_track_tracks_everything_in_it() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), _Block(),
                          nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))).double()
    layout = build_layout(model, ["1"])
    assert [layer.name for layer in layout.layers] == ["1.fc1", "1.fc2"]
    assert [fb.name for fb in layout.fallback] == ["1.gamma", "1.norm.weight", "1.norm.bias"]
    assert layout.total == sum(p.numel() for p in model[1].parameters())
    assert [layer.name for layer in build_layout(model, ["2"]).layers] == ["2.0", "2.2"]
    _assert_exact(model, torch.rand(3, 4, dtype=torch.float64), track=["1", "2"])


class _Recurrent(nn.Module):
    """A CPC-style encoder: convolution, then a GRU over time."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 5, 4, stride=2)
        self.rnn = nn.GRU(5, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(torch.relu(self.conv(x)).transpose(1, 2))
        return self.head(out[:, -1])


def test_modules_vmap_cannot_batch_are_taken_one_example_at_a_time() -> None:
    torch.manual_seed(0)
    model = _Recurrent().double().eval()
    x = torch.rand(3, 2, 12, dtype=torch.float64)
    layout = build_layout(model, ["conv", "rnn", "head"])
    feat = Featurizer(model, layout, _loss(), issl.Projection("identity"))
    ids = torch.arange(3)
    with pytest.warns(RuntimeWarning, match="vmap cannot batch.*rnn.weight_ih_l0"):
        phi, _ = feat(x, ids)
    torch.testing.assert_close(phi, _truth(model, layout, _loss(), x, ids), rtol=1e-9,
                               atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        again, _ = feat(x, ids)
    assert torch.equal(again, phi)


class _Squeezed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)).squeeze())  # [1, 4] would become [4]


def test_a_squeeze_in_the_encoder_and_a_first_batch_of_one_example() -> None:
    torch.manual_seed(0)
    _assert_exact(_Squeezed().double(), torch.rand(1, 3, 6, 6, dtype=torch.float64), views=1)


class _Frames(nn.Module):
    """A 2-D CNN applied to each frame of a clip [N, T, C, H, W], frames folded into the batch
    (frame-major instead with ``frame_major``: not an example's rows together). ``as_3d``: the
    same network as a Conv3d with a temporal kernel of 1 over [N, C, T, H, W] (the same weight
    layout and gradient, no folding), to compare the sketches with."""

    def __init__(self, groups: int = 1, as_3d: bool = False, frame_major: bool = False) -> None:
        super().__init__()
        self.as_3d, self.frame_major = as_3d, frame_major
        if as_3d:
            self.c1 = nn.Conv3d(4, 6, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1),
                                groups=groups)
        else:
            self.c1 = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=groups)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t = x.shape[:2]
        if self.as_3d:
            h = torch.tanh(self.c1(x.transpose(1, 2))).mean((3, 4)).transpose(1, 2)
        elif self.frame_major:
            h = self.c1(x.transpose(0, 1).reshape(t * n, *x.shape[2:]))
            h = torch.tanh(h).mean((2, 3)).reshape(t, n, -1).transpose(0, 1)
        else:
            h = torch.tanh(self.c1(x.reshape(n * t, *x.shape[2:]))).mean((2, 3))
            h = h.reshape(n, t, -1)
        return self.head(h.mean(1))


@pytest.mark.parametrize("groups", [1, 2])
def test_frames_folded_into_a_convolutions_batch_are_featurised_exactly(groups) -> None:
    torch.manual_seed(0)
    model = _Frames(groups).double()
    _assert_exact(model, torch.rand(3, 5, 4, 6, 7, dtype=torch.float64))
    # one example (the probe runs on one row more), then batches of other sizes that reuse
    # the probed answer
    feat = Featurizer(model, build_layout(model), _loss(), issl.Projection("identity"))
    for b in (1, 4, 2):
        x = torch.rand(b, 5, 4, 6, 7, dtype=torch.float64)
        ids = torch.arange(b) + 10 * b
        phi, _ = feat(x, ids)
        torch.testing.assert_close(phi, _truth(model, feat.layout, _loss(), x, ids),
                                   rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["kron", "dense"])
@pytest.mark.parametrize("groups", [1, 2])
def test_folded_frames_sketch_like_a_conv3d_over_time(kind, groups, monkeypatch) -> None:
    # a Conv2d over folded frames and a Conv3d with a temporal kernel of 1 have the same weight
    # layout and per-example gradients, so the same sketches and EK-FAC statistics
    torch.manual_seed(0)
    folded, conv3d = _Frames(groups), _Frames(groups, as_3d=True)
    with torch.no_grad():
        conv3d.c1.weight.copy_(folded.c1.weight[:, :, None])
        conv3d.c1.bias.copy_(folded.c1.bias)
        conv3d.head.load_state_dict(folded.head.state_dict())
    x, ids = torch.rand(4, 3, 4, 6, 7), torch.arange(4)
    out = []
    for model, chunk in ((folded, 1 << 20), (conv3d, 1 << 20), (folded, 1)):
        # (chunk 1: the factors formed one example at a time)
        monkeypatch.setattr("issl_fast.featurize.FACTOR_CHUNK_BYTES", chunk)
        feat = Featurizer(model, build_layout(model), _loss(), issl.Projection(kind, k=16),
                          collect_stats=True)
        out.append(feat(x, ids))
    for phi, stats in out[1:]:
        torch.testing.assert_close(phi, out[0][0], rtol=2e-4, atol=1e-6)
        assert stats.keys() == out[0][1].keys()
        for key in stats:
            torch.testing.assert_close(stats[key], out[0][1][key], rtol=1e-4, atol=1e-8)
    # the convolution's statistics were compared (a grouped one has none: Gauss-Newton block)
    assert ("c1/A" in out[0][1]) == (kind == "kron" and groups == 1)


def test_folded_frames_score_through_a_store_as_the_conv3d_does(tmp_path) -> None:
    # featurize (batches of 4, 4, 3: the probed answer reused on a smaller last batch) ->
    # EK-FAC fit -> score: the same top proponents and scores as the Conv3d over time
    torch.manual_seed(0)
    folded, conv3d = _Frames(), _Frames(as_3d=True)
    with torch.no_grad():
        conv3d.c1.weight.copy_(folded.c1.weight[:, :, None])
        conv3d.c1.bias.copy_(folded.c1.bias)
        conv3d.head.load_state_dict(folded.head.state_dict())
    x = torch.rand(11, 3, 4, 6, 7)
    tops = []
    for name, model in (("folded", folded), ("conv3d", conv3d)):
        attr = issl.InfluenceSSL(model, _loss(), issl.Projection("kron", k=16), "ekfac")
        attr.featurize(DataLoader(TensorDataset(x), batch_size=4), tmp_path / name,
                       progress=False)
        attr.fit(tmp_path / name)
        tops.append(attr.score(x[:3], ids=torch.arange(3), topk=4))
    assert tops[0].ids.tolist() == tops[1].ids.tolist()
    np.testing.assert_allclose(tops[0].values, tops[1].values, rtol=2e-3)


def test_frames_folded_frame_major_or_by_another_count_are_errors_naming_the_way_out() -> None:
    torch.manual_seed(0)
    x = torch.rand(3, 2, 4, 6, 6, dtype=torch.float64)
    model = _Frames(frame_major=True).double()
    attr = issl.InfluenceSSL(model, _loss(), issl.Projection("kron", k=9), "block")
    with pytest.raises(ValueError, match=r"layer 'c1': the rows of its input \(18, 4, 6, 6\) "
                                         r"are not grouped by example"):
        attr.features(x)

    class _Extra(_Frames):  # one constant frame more than the clips' (not a multiple of rows)
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("blank", torch.zeros(1, 4, 6, 6))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(self.c1(torch.cat([x.flatten(0, 1), self.blank])))[:-1]
            return self.head(h.mean((2, 3)).unflatten(0, x.shape[:2]).mean(1))

    attr = issl.InfluenceSSL(_Extra().double(), _loss(), issl.Projection("kron", k=9), "block")
    with pytest.raises(ValueError, match=r"layer 'c1' ran on 19 rows for a batch of 9 .*"
                                         r"track=\['<layer>.weight'"):
        attr.features(x)
    _assert_exact(_Extra().double(), x, track=["c1.weight", "c1.bias", "head"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_identity_features_of_a_half_precision_encoder_are_float32(dtype) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)
    attr = issl.InfluenceSSL(model, _loss(), issl.Projection("identity"), "identity")
    phi = attr.features(torch.rand(2, 3, 2, 2).to(dtype))
    assert phi.dtype == torch.float32 and np.isfinite(phi.numpy()).all()


def test_the_weights_hash_sees_updates_that_keep_the_version_counter(tmp_path) -> None:
    # momentum (EMA) encoders are updated through p.data, which leaves p._version as it was
    torch.manual_seed(0)
    model = _trained_bn(_ResNet())
    attr = issl.InfluenceSSL(model, _loss(), issl.Projection("kron", k=16), "block")
    store = attr.featurize(DataLoader(TensorDataset(torch.rand(6, 3, 8, 8)), batch_size=3),
                           tmp_path / "s", progress=False)
    attr.fit(store)
    versions = [p._version for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.data.mul_(0.99).add_(0.01 * torch.randn_like(p))
    assert [p._version for p in model.parameters()] == versions
    with pytest.raises(StoreError, match="built differently: model"):
        attr.score(torch.rand(2, 3, 8, 8), topk=2)
    assert attr.fingerprint()["model"] == model_fingerprint(model)
