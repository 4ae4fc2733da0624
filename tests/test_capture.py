"""Fused hook-based capture equals brute force: the sketches built from captured layer factors
equal sketch_dense of torch.func per-example gradients of the same loss (small CNN with Conv2d,
Linear and a non-fused LayerNorm)."""

from __future__ import annotations

import issl_fast as issl
import pytest
import torch
from engine_models import UniformNoise, batches, images, small_cnn, tiny_vit
from issl_fast.capture import FactorCapture, build_layout
from issl_fast.featurize import Featurizer, model_device
from torch.func import functional_call, grad, vmap

# Sketch sums over ~4k gradient entries in float32 on both sides.
SKETCH_RTOL = 2e-4
# The kron path sums float32 per-row factor products whose terms largely cancel in G (an
# example's anchor and views pull opposite ways): relative to G's largest entry its float32
# error reaches ~3e-4 on small layers (measured against float64: 2.8e-4 on the output Linear of
# the grouped/padded model; the float32 reference from the exact G is within 1e-7).
KRON_RTOL = 5e-4


def _brute_force_flat_grads(model, layout, loss, x, ids) -> torch.Tensor:
    """Per-example flat gradients in the layout's order, from torch.func."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    inputs = loss.encoder_inputs(x, ids)
    groups, b = loss.groups, x.shape[0]
    per_ex = inputs.reshape(groups, b, *inputs.shape[1:]).transpose(0, 1)

    def one(p, xin):
        return loss.from_outputs(functional_call(model, p, (xin,)), 1).sum()

    g = vmap(grad(one), in_dims=(None, 0))(params, per_ex)
    parts = []
    for layer in layout.layers:
        w = g[layer.params[0]].reshape(b, layer.d_out, -1)
        if layer.has_bias:
            w = torch.cat([w, g[layer.params[1]][:, :, None]], dim=2)
        parts.append(w.reshape(b, -1))
    parts += [g[fb.name].reshape(b, -1) for fb in layout.fallback]
    return torch.cat(parts, dim=1)


def _assert_identity_exact(model, layout, loss, x, ids) -> torch.Tensor:
    """The identity features equal the brute-force per-example gradients (float64 models: to
    1e-10); returns the brute-force gradients for further checks."""
    brute = _brute_force_flat_grads(model, layout, loss, x, ids)
    phi, _ = Featurizer(model, layout, loss, issl.Projection("identity"))(x, ids)
    torch.testing.assert_close(phi, brute, rtol=1e-10, atol=1e-12)
    return brute


def _assert_kron_blocks_match(model, layout, loss, x, ids, brute: torch.Tensor) -> None:
    """Each layer's kron block is ``vec(P_out G P_in^T)`` of its brute-force gradient G."""
    feat = Featurizer(model, layout, loss, issl.Projection("kron", k=9, seed=2))
    phi, _ = feat(x, ids)
    for layer, block in zip(layout.layers, feat.blocks):
        G = brute[:, layer.offset : layer.offset + layer.numel].reshape(-1, layer.d_out, layer.d_in)
        p_in, p_out = feat._projections(block, layer.d_in, layer.d_out)
        want = (p_out @ G @ p_in.T).reshape(x.shape[0], -1)
        err = (phi[:, block.start : block.stop] - want).abs().max() / want.abs().max()
        assert err.item() < KRON_RTOL, layer.name


@pytest.fixture()
def setup():
    model = small_cnn()
    loss = issl.AugmentationStability(views=2, seed=4, augment=issl.SSLAugment.light(seed=4))
    layout = build_layout(model, track=["0", "2", "5", "6", "8"])  # 6 = LayerNorm (fallback)
    x = images(7)
    ids = torch.tensor([3, 1, 4, 1000, 5, 9, 2])
    return model, loss, layout, x, ids


def test_layout_covers_every_tracked_parameter(setup) -> None:
    model, _, layout, _, _ = setup
    assert [layer.kind for layer in layout.layers] == ["conv2d", "conv2d", "linear", "linear"]
    assert [fb.name for fb in layout.fallback] == ["6.weight", "6.bias"]
    assert layout.total == sum(p.numel() for p in model.parameters())


def test_identity_features_equal_per_example_gradients(setup) -> None:
    model, loss, layout, x, ids = setup
    phi, _ = Featurizer(model, layout, loss, issl.Projection("identity"))(x, ids)
    brute = _brute_force_flat_grads(model, layout, loss, x, ids)
    torch.testing.assert_close(phi, brute, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_dense_sketch_equals_sketch_of_brute_force(setup, dist) -> None:
    model, loss, layout, x, ids = setup
    proj = issl.Projection("dense", k=300, seed=11, dist=dist)
    phi, _ = Featurizer(model, layout, loss, proj)(x, ids)
    brute = _brute_force_flat_grads(model, layout, loss, x, ids)
    want = issl.sketch_dense(brute.contiguous(), 300, seed=11, dist=dist)
    err = (phi - want).abs().max() / want.abs().max()
    assert err.item() < SKETCH_RTOL


def test_kron_blocks_equal_kron_of_brute_force(setup) -> None:
    """Each layer block is vec(P_out G P_in^T) of that layer's brute-force gradient."""
    model, loss, layout, x, ids = setup
    feat = Featurizer(model, layout, loss, issl.Projection("kron", k=16, seed=2, k_fallback=20))
    phi, _ = feat(x, ids)
    brute = _brute_force_flat_grads(model, layout, loss, x, ids)
    for layer, block in zip(layout.layers, feat.blocks):
        G = brute[:, layer.offset : layer.offset + layer.numel].reshape(-1, layer.d_out, layer.d_in)
        p_in, p_out = issl.reference.kron_matrices(
            block.seed, layer.d_in, layer.d_out, block.k_in, block.k_out
        )
        p_in = torch.from_numpy(p_in).float() / block.k_in**0.5
        p_out = torch.from_numpy(p_out).float() / block.k_out**0.5
        want = (p_out @ G @ p_in.T).reshape(x.shape[0], -1)
        err = (phi[:, block.start : block.stop] - want).abs().max() / want.abs().max()
        assert err.item() < KRON_RTOL, layer.name
    fb = feat.blocks[-1]
    fb_grad = brute[:, layout.fallback[0].offset :].contiguous()
    want = issl.sketch_dense(fb_grad, fb.dim, seed=fb.seed)
    torch.testing.assert_close(phi[:, fb.start : fb.stop], want, rtol=SKETCH_RTOL, atol=1e-6)


def test_representation_picks_output_and_unused_layers_get_zero(setup) -> None:
    """With the representation taken before the last Linear, that layer's gradient is zero."""
    model, _, layout, x, ids = setup
    backbone = torch.nn.Sequential(*list(model.children())[:-1])

    class Both(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = backbone, list(model.children())[-1]

        def forward(self, inp):
            h = self.body(inp)
            return h, self.head(h)

    enc = Both()
    loss = issl.AugmentationStability(
        views=2, seed=4, augment=issl.SSLAugment.light(seed=4), representation=lambda out: out[0]
    )
    lay = build_layout(enc)
    phi, _ = Featurizer(enc, lay, loss, issl.Projection("identity"))(x, ids)
    head = lay.layers[-1]
    assert head.name == "head"
    assert torch.count_nonzero(phi[:, head.offset : head.offset + head.numel]) == 0
    assert torch.count_nonzero(phi[:, : head.offset]) > 0


def test_model_device_and_the_projection_cache() -> None:
    # The device is read from the parameters, then the buffers; a module with neither is on
    # the CPU (the engine follows a model moved after it was built: tests/test_engine_cuda.py).
    assert model_device(small_cnn()) == torch.device("cpu")
    assert model_device(torch.nn.ReLU()) == torch.device("cpu")
    meta = torch.nn.BatchNorm1d(3, affine=False).to("meta")  # buffers only
    assert model_device(meta) == torch.device("meta")
    assert model_device(torch.nn.Linear(2, 2, device="meta")) == torch.device("meta")
    # The kron projections are drawn once and cached per device; the same matrices everywhere.
    model = small_cnn()
    loss = issl.AugmentationStability(views=1, seed=0)
    layout = build_layout(model)
    feat = Featurizer(model, layout, loss, issl.Projection("kron", k=16, seed=2))
    block, layer = feat.blocks[0], layout.layers[0]
    p_in, p_out = feat._projections(block, layer.d_in, layer.d_out)
    assert feat._projections(block, layer.d_in, layer.d_out, torch.device("cpu"))[0] is p_in
    m_in, m_out = feat._projections(block, layer.d_in, layer.d_out, "meta")
    assert m_in.device.type == "meta" and m_in.shape == p_in.shape
    assert m_out.shape == p_out.shape == (block.k_out, layer.d_out)


@pytest.mark.filterwarnings("ignore:Using padding='same'")  # torch: an even kernel pads a copy
def test_string_padding_convolutions_match_per_example_gradients() -> None:
    # padding="same" (odd and even kernels, with dilation: asymmetric zero padding) and "valid",
    # through both capture paths (im2col factors: identity; conv2d by P_in: kron).
    torch.manual_seed(3)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding="same"), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 5, (2, 4), padding="same", dilation=(1, 2)), torch.nn.ReLU(),
        torch.nn.Conv2d(5, 4, 3, padding="valid"), torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 6))
    loss = issl.AugmentationStability(views=2, seed=1, augment=issl.SSLAugment.light(seed=1))
    layout = build_layout(model)
    x, ids = torch.rand(3, 3, 8, 8), torch.arange(3)
    brute = _brute_force_flat_grads(model, layout, loss, x, ids)
    phi, _ = Featurizer(model, layout, loss, issl.Projection("identity"))(x, ids)
    torch.testing.assert_close(phi, brute, rtol=1e-4, atol=1e-6)
    _assert_kron_blocks_match(model, layout, loss, x, ids, brute.float())


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch.func's reference
def test_multihead_attention_projections_are_fused_layers() -> None:
    # nn.MultiheadAttention applies its projections with F.linear (no module call, no hook):
    # they are recorded through F.linear as two Linear layers, exact against torch.func.
    torch.manual_seed(0)
    model = tiny_vit().double()
    layout = build_layout(model)
    assert [layer.name for layer in layout.layers] == [
        "patch", "enc.self_attn.in_proj", "enc.self_attn.out_proj", "enc.linear1",
        "enc.linear2", "head"]
    assert layout.layers[1].params == ("enc.self_attn.in_proj_weight",
                                       "enc.self_attn.in_proj_bias")
    assert (layout.layers[1].d_in, layout.layers[1].d_out) == (8 + 1, 24) and not layout.fallback
    # every parameter but the two LayerNorms' (not tracked by default, like any other module)
    assert layout.total == sum(p.numel() for p in model.parameters()) - 4 * 8
    loss = issl.AugmentationStability(views=2, seed=2, augment=issl.SSLAugment.light(seed=2))
    x, ids = torch.rand(3, 3, 12, 12, dtype=torch.float64), torch.arange(3)
    brute = _assert_identity_exact(model, layout, loss, x, ids)
    assert torch.nn.functional.linear is torch._C._nn.linear  # restored after the capture
    _assert_kron_blocks_match(model, layout, loss, x, ids, brute.float())
    # Naming out_proj in track= fuses it alone; naming the attention module and its parts
    # again takes each layer and parameter once.
    named = build_layout(model, track=["enc.self_attn.out_proj", "head"])
    assert [layer.name for layer in named.layers] == ["enc.self_attn.out_proj", "head"]
    both = build_layout(model, track=["enc.self_attn.out_proj", "enc.self_attn",
                                      "enc.self_attn.in_proj_bias"])
    assert [layer.name for layer in both.layers] == ["enc.self_attn.out_proj",
                                                     "enc.self_attn.in_proj"]
    assert not both.fallback


class _CrossAttention(torch.nn.Module):
    """Cross-attention (query from some tokens, key = value from others: a split projection),
    attention with query, key and value all different (three row slices), a masked
    self-attention without biases in sequence-first layout, and an attention the fused capture
    does not cover (kdim != embed_dim: torch.func)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(3, 6)
        self.cross = torch.nn.MultiheadAttention(6, 2, batch_first=True)
        self.triple = torch.nn.MultiheadAttention(6, 1, batch_first=True)
        self.masked = torch.nn.MultiheadAttention(6, 3, bias=False)
        self.other = torch.nn.MultiheadAttention(6, 2, kdim=4, vdim=4, batch_first=True)
        self.keys = torch.nn.Linear(6, 4)
        self.head = torch.nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x.flatten(2).transpose(1, 2))  # [N, 144, 6]
        q, kv = t[:, :8], t[:, 8:20]
        h, _ = self.cross(q, kv, kv)  # need_weights=True: the explicit softmax path
        h = h + self.triple(h, t[:, 20:30], t[:, 30:40], need_weights=False)[0]
        causal = torch.triu(torch.ones(8, 8, dtype=torch.bool), diagonal=1)
        s = h.transpose(0, 1)
        h = self.masked(s, s, s, attn_mask=causal, need_weights=False)[0].transpose(0, 1)
        k = self.keys(h)
        h = self.other(h, k, k, need_weights=False)[0]
        return self.head(h.mean(1))


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_cross_and_masked_attention_are_exact_and_other_forms_fall_back() -> None:
    torch.manual_seed(4)
    model = _CrossAttention().double()
    layout = build_layout(model)
    assert [layer.name for layer in layout.layers] == [
        "embed", "cross.in_proj", "cross.out_proj", "triple.in_proj", "triple.out_proj",
        "masked.in_proj", "masked.out_proj", "keys", "head"]
    assert [fb.name for fb in layout.fallback] == [
        "other.q_proj_weight", "other.k_proj_weight", "other.v_proj_weight",
        "other.in_proj_bias", "other.out_proj.weight", "other.out_proj.bias"]
    loss = issl.AugmentationStability(views=2, seed=1, augment=issl.SSLAugment.light(seed=1))
    x, ids = torch.rand(3, 3, 12, 12, dtype=torch.float64), torch.arange(3)
    brute = _assert_identity_exact(model, layout, loss, x, ids)
    _assert_kron_blocks_match(model, layout, loss, x, ids, brute.float())


class _Mixed(torch.nn.Module):
    """A depthwise and a grouped convolution (their exact per-example gradients), reflect /
    replicate / circular padded ones (the padding made explicit), a Linear called twice (shared
    weights: its factors concatenate both calls) and a 1x1 convolution: all fused."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = torch.nn.Conv2d(3, 3, 3, groups=3, padding=1)
        self.pw = torch.nn.Conv2d(3, 6, 1)
        self.grouped = torch.nn.Conv2d(6, 6, (3, 2), groups=2, stride=(2, 1), dilation=(1, 2),
                                       padding=2, padding_mode="reflect", bias=False)
        self.reflect = torch.nn.Conv2d(6, 4, 3, padding=1, padding_mode="reflect")
        self.replicate = torch.nn.Conv2d(4, 4, (3, 2), padding="same", padding_mode="replicate")
        self.circular = torch.nn.Conv2d(4, 4, 3, stride=2, padding=(2, 1), dilation=(2, 1),
                                        padding_mode="circular")
        self.shared = torch.nn.Linear(4, 4)
        self.out = torch.nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.reflect(torch.relu(self.grouped(torch.relu(self.pw(self.dw(x))))))
        h = self.circular(torch.relu(self.replicate(h))).mean((2, 3))
        return self.out(torch.tanh(self.shared(torch.tanh(self.shared(h)))))


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_grouped_padded_and_shared_layers_are_tracked_exactly() -> None:
    torch.manual_seed(1)
    model = _Mixed().double()  # float64 truth: the sketches' own float32 error is what is left
    layout = build_layout(model)
    assert [layer.name for layer in layout.layers] == ["dw", "pw", "grouped", "reflect",
                                                       "replicate", "circular", "shared", "out"]
    assert [layer.groups for layer in layout.layers][:3] == [3, 1, 2] and not layout.fallback
    assert layout.total == sum(p.numel() for p in model.parameters())
    loss = issl.AugmentationStability(views=2, seed=3, augment=issl.SSLAugment.light(seed=3))
    x, ids = torch.rand(4, 3, 9, 9, dtype=torch.float64), torch.arange(4)
    brute = _assert_identity_exact(model, layout, loss, x, ids)
    brute = brute.float()
    proj = issl.Projection("dense", k=200, seed=5)
    phi, _ = Featurizer(model, layout, loss, proj)(x, ids)
    want = issl.sketch_dense(brute.contiguous(), 200, seed=5)
    assert ((phi - want).abs().max() / want.abs().max()).item() < SKETCH_RTOL
    # The kron path sketches convolutions with conv2d by P_in over the explicitly padded input
    # (grouped ones: P_out G P_in^T of their exact gradient).
    _assert_kron_blocks_match(model, layout, loss, x, ids, brute.float())


def test_tied_and_attention_subclass_parameters_are_tracked_once() -> None:
    # Tied weights: named_parameters() names the tensor once (as "a.weight"); so does the layout.
    tied = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh(), torch.nn.Linear(3, 3))
    tied[2].weight = tied[0].weight
    for lin in (tied[0], tied[2]):
        lin.bias.requires_grad_(False)  # not fusable: their weights take the fallback
    layout = build_layout(tied)
    assert [fb.name for fb in layout.fallback] == ["0.weight"] and not layout.layers

    # An attention subclass with a Linear child of its own: each projection and that Linear are
    # fused, once.
    class Gated(torch.nn.MultiheadAttention):
        def __init__(self) -> None:
            super().__init__(4, 2, batch_first=True)
            self.gate = torch.nn.Linear(4, 4)

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model.add_module("att", Gated())
    layout = build_layout(model)
    assert [layer.name for layer in layout.layers] == ["0", "att.in_proj", "att.out_proj",
                                                       "att.gate"]
    assert not layout.fallback
    assert layout.total == sum(p.numel() for p in model.parameters())


def test_ekfac_gives_grouped_convolutions_a_gauss_newton_block(tmp_path) -> None:
    # A grouped convolution's gradient is block-diagonal, not a pair of Kronecker factors: its
    # kron block is fitted as a Gauss-Newton (Cholesky) block, the others by EK-FAC.
    torch.manual_seed(2)
    loss = issl.AugmentationStability(views=2, seed=3, augment=issl.SSLAugment.light(seed=3))
    attr = issl.InfluenceSSL(_Mixed(), loss, issl.Projection("kron", k=9, seed=2), "ekfac")
    kinds = {b.name: b.kind for b in attr.featurizer.blocks}
    assert kinds["dw"] == kinds["grouped"] == "kron_grouped" and kinds["pw"] == "kron"
    store = attr.featurize(batches(torch.rand(12, 3, 9, 9), 5), tmp_path / "s", progress=False)
    assert "pw/A" in store.stats() and "dw/A" not in store.stats()
    attr.fit(store)
    parts = {b.name: type(p).__name__ for b, p in attr.solver._parts}
    assert parts["dw"] == parts["grouped"] == "_CholeskyBlock" and parts["pw"] == "_EKFACBlock"
    assert (attr.self_influence() > 0).all()


class _SeqFirst(torch.nn.Module):
    """torch's default sequence-first transformer layer ([T, N, E] inside), norm_first, with a
    causal mask; then out_proj applied again as a module, outside the attention's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = torch.nn.Conv2d(3, 8, 4, stride=4)
        self.enc = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, norm_first=True)
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).permute(2, 0, 1)  # [T, N, E]
        mask = torch.nn.Transformer.generate_square_subsequent_mask(t.shape[0], dtype=t.dtype)
        t = self.enc(t, src_mask=mask, is_causal=True)
        t = self.enc.self_attn.out_proj(t.transpose(0, 1))  # [N, T, E], a plain module call
        return self.head(t.mean(1))


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("batch", [3, 2])  # 3: T = 9 = views x examples, the ambiguous case
def test_sequence_first_transformers_are_exact(batch) -> None:
    torch.manual_seed(5)
    model = _SeqFirst().double().eval()
    layout = build_layout(model)
    assert [layer.seq_first for layer in layout.layers] == [False, False, False, True, True,
                                                            False]
    loss = issl.AugmentationStability(views=2, seed=1, augment=issl.SSLAugment.light(seed=1))
    x, ids = torch.rand(batch, 3, 12, 12, dtype=torch.float64), torch.arange(batch)
    _assert_identity_exact(model, layout, loss, x, ids)


def test_inputs_without_a_batch_dimension_and_stray_projections_are_errors() -> None:
    loss = issl.AugmentationStability(views=1, augment=UniformNoise())

    class Folded(torch.nn.Module):  # a Linear over rows that mix examples
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x.reshape(2, -1, 4)).reshape(x.shape[0], -1)

    model = Folded()
    with pytest.raises(ValueError, match="neither its first nor its second dimension"):
        Featurizer(model, build_layout(model), loss, issl.Projection("identity"))(
            torch.rand(3, 5, 4), torch.arange(3))

    class Stray(torch.nn.Module):  # the packed projection used outside the attention
        def __init__(self) -> None:
            super().__init__()
            self.att = torch.nn.MultiheadAttention(4, 1, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.att(x, x, x)[0]
            return torch.nn.functional.linear(h, self.att.in_proj_weight).mean(1)

    model = Stray()
    with pytest.raises(RuntimeError, match="outside its nn.MultiheadAttention's forward"):
        Featurizer(model, build_layout(model), loss, issl.Projection("identity"))(
            torch.rand(2, 5, 4), torch.arange(2))
    assert torch.nn.functional.linear is torch._C._nn.linear  # restored after the error

    class Clash(torch.nn.MultiheadAttention):
        def __init__(self) -> None:
            super().__init__(4, 1)
            self.in_proj = torch.nn.Linear(4, 4)

    with pytest.raises(ValueError, match="both named"):
        build_layout(torch.nn.Sequential(Clash()))


class _ResidualAttentionBlock(torch.nn.Module):
    """open_clip's block: a sequence-first attention and an MLP of Linears (not torch's
    transformer layer), both on [L, N, D]."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(8, 2)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(),
                                       torch.nn.Linear(16, 8))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t = t + self.attn(t, t, t, need_weights=False)[0]
        return t + self.mlp(t)


class _ClipThenWindows(torch.nn.Module):
    """Tokens (side x side) through an open_clip block, then Swin-like windows: a Linear on
    [N * 4, 9, D] (each example's 4 windows of 9 tokens together)."""

    def __init__(self, tokens_per_side: int) -> None:
        super().__init__()
        self.patch = torch.nn.Conv2d(3, 8, 12 // tokens_per_side, stride=12 // tokens_per_side)
        self.block = _ResidualAttentionBlock()
        self.win = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.block(self.patch(x).flatten(2).permute(2, 0, 1))  # [L, N, 8]
        n, u = t.shape[1], t.permute(1, 0, 2)
        u = u.repeat(1, 36 // u.shape[1], 1)  # 36 tokens
        w = self.win(u.reshape(n * 4, 9, 8))
        return self.head(w.reshape(n, 36, 8).mean(1))


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize(("side", "batch"), [(3, 3), (6, 3), (6, 2)])
def test_open_clip_blocks_and_windows_are_exact(side, batch) -> None:
    # (3, 3): L = 9 = views x examples inside the sequence-first block; (6, 3): 36 tokens and
    # windows of 9 = views x examples. Where both of an input's first two sizes fit the batch,
    # a probe with one row fewer tells which one it is.
    torch.manual_seed(6)
    model = _ClipThenWindows(side).double().eval()
    layout = build_layout(model)
    assert not [layer.name for layer in layout.layers if layer.seq_first]  # found from shapes
    loss = issl.AugmentationStability(views=2, seed=1, augment=issl.SSLAugment.light(seed=1))
    x, ids = torch.rand(batch, 3, 12, 12, dtype=torch.float64), torch.arange(batch)
    _assert_identity_exact(model, layout, loss, x, ids)


def test_captures_nest_and_run_in_threads() -> None:
    import threading

    loss = issl.AugmentationStability(views=2, seed=2, augment=issl.SSLAugment.light(seed=2))
    models = [tiny_vit(seed=s) for s in range(4)]
    feats = [Featurizer(m, build_layout(m), loss, issl.Projection("kron", k=16)) for m in models]
    x, ids = torch.rand(3, 3, 12, 12), torch.arange(3)
    alone = [f(x, ids)[0] for f in feats]
    # Two captures open on one model both see its attention; closing out of order, from
    # another thread, or entering twice leave torch's F.linear in place; a reference to the
    # wrapper taken meanwhile keeps working.
    layout = feats[0].layout
    a, b = FactorCapture(layout), FactorCapture(layout)
    a.__enter__()
    b.__enter__()
    wrapper = torch.nn.functional.linear
    with pytest.raises(RuntimeError, match="already open"):
        b._functional.__enter__()
    inputs = loss.encoder_inputs(x, ids)
    with torch.enable_grad():
        losses = loss.from_outputs(models[0](inputs), 3)
        a.backward(losses.sum())
    for layer in layout.layers:
        assert len(a.calls(layer)) == len(b._inputs[layer.name]) == 1, layer.name
    closer = threading.Thread(target=a.__exit__, args=(None, None, None))
    closer.start()
    closer.join()
    b.__exit__(None, None, None)
    assert torch.nn.functional.linear is torch._C._nn.linear
    assert not getattr(issl.attention._local, "open", [])  # a closed from the other thread too
    assert torch.equal(wrapper(x[0, 0], x[0, 0]), x[0, 0] @ x[0, 0].T)
    # Four threads featurising four models at once (and two on the same model) agree with the
    # results computed one at a time.
    results: dict[int, torch.Tensor] = {}

    def run(i: int, f: Featurizer) -> None:
        for _ in range(3):
            results[i] = f(x, ids)[0]

    jobs = [threading.Thread(target=run, args=(i, f)) for i, f in enumerate(feats + feats[:1])]
    for j in jobs:
        j.start()
    for j in jobs:
        j.join()
    for i in range(len(jobs)):
        torch.testing.assert_close(results[i], alone[i % 4], rtol=1e-5, atol=1e-7)
    assert torch.nn.functional.linear is torch._C._nn.linear


class _StdConv2d(torch.nn.Conv2d):
    """Weight standardisation (BiT ResNets): the forward uses a function of the weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return torch.nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)


class _Reparametrised(torch.nn.Module):
    """A standardised conv, a DINO-style head whose last layer is weight-normed (new and old
    APIs), a spectral-normed Linear, and a block that can be checkpointed (non-reentrant: its
    forward is recomputed during backward; torch.func cannot run it, so only without the
    reparametrised layers)."""

    def __init__(self) -> None:
        super().__init__()
        self.std = _StdConv2d(3, 4, 3, stride=2)
        self.block = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh())
        self.wn_new = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(6, 6))
        self.wn_old = torch.nn.utils.weight_norm(torch.nn.Linear(6, 6))
        self.sn = torch.nn.utils.parametrizations.spectral_norm(torch.nn.Linear(6, 6))
        self.out = torch.nn.Linear(6, 5)
        self.checkpointed, self.plain = False, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.std(x).mean((2, 3))
        if self.checkpointed:
            h = torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=False)
        else:
            h = self.block(h)
        if not self.plain:
            h = torch.tanh(self.sn(torch.tanh(self.wn_old(torch.tanh(self.wn_new(h))))))
        return self.out(h)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # the older weight_norm API, on purpose
def test_reparametrised_weights_and_checkpointed_blocks_are_exact() -> None:
    torch.manual_seed(7)
    model = _Reparametrised().double().eval()
    layout = build_layout(model)
    assert [layer.name for layer in layout.layers] == ["block.0", "out"]
    assert [fb.name for fb in layout.fallback] == [
        "std.weight", "std.bias", "wn_new.bias", "wn_new.parametrizations.weight.original0",
        "wn_new.parametrizations.weight.original1", "wn_old.bias", "wn_old.weight_g",
        "wn_old.weight_v", "sn.bias", "sn.parametrizations.weight.original"]
    assert layout.total == sum(p.numel() for p in model.parameters())
    loss = issl.AugmentationStability(views=2, seed=3, augment=issl.SSLAugment.light(seed=3))
    x, ids = torch.rand(3, 3, 9, 9, dtype=torch.float64), torch.arange(3)
    brute = _assert_identity_exact(model, layout, loss, x, ids)
    # A checkpointed block recomputes its forward inside backward(): the hooks record the
    # forward pass only (fused layers only: torch.func cannot differentiate a checkpoint).
    model.plain = True
    layout = build_layout(model, track=["block.0", "out"])
    brute = _brute_force_flat_grads(model, layout, loss, x, ids)
    model.checkpointed = True
    phi, _ = Featurizer(model, layout, loss, issl.Projection("identity"))(x, ids)
    torch.testing.assert_close(phi, brute, rtol=1e-10, atol=1e-12)

    class Functional(torch.nn.Module):  # applies its Linear's weight without calling it
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.linear(x, self.lin.weight, self.lin.bias)

    model = Functional()
    loss = issl.AugmentationStability(views=1, augment=UniformNoise())
    with pytest.raises(RuntimeError, match="F.linear / F.conv2d"):
        Featurizer(model, build_layout(model), loss, issl.Projection("identity"))(
            torch.rand(2, 4), torch.arange(2))


class _AttentionPooling(torch.nn.Module):
    """A batch-first MLP over tokens, then a root-level sequence-first attention pooling (a
    query token attending over [T, N, D]) and a head: layers beside a sequence-first attention
    that are batch-first themselves."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = torch.nn.Conv2d(3, 8, 4, stride=4)
        self.mlp = torch.nn.Linear(8, 8)
        self.pool = torch.nn.MultiheadAttention(8, 2)
        self.query = torch.nn.Parameter(torch.randn(1, 1, 8))
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.tanh(self.mlp(self.patch(x).flatten(2).transpose(1, 2)))  # [N, 9, 8]
        kv = t.transpose(0, 1)  # [9, N, 8]
        q = self.query.expand(1, t.shape[0], 8)
        return self.head(self.pool(q, kv, kv, need_weights=False)[0][0])


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("batch", [3, 2])  # 3: the MLP's [9, 9, 8] input is ambiguous
def test_batch_first_layers_beside_sequence_first_attention_are_exact(batch) -> None:
    torch.manual_seed(8)
    model = _AttentionPooling().double()
    layout = build_layout(model, track=["patch", "mlp", "pool", "head"])
    loss = issl.AugmentationStability(views=2, seed=1, augment=issl.SSLAugment.light(seed=1))
    x, ids = torch.rand(batch, 3, 12, 12, dtype=torch.float64), torch.arange(batch)
    brute = _brute_force_flat_grads(model, layout, loss, x, ids)
    feat = Featurizer(model, layout, loss, issl.Projection("identity"))
    phi, _ = feat(x, ids)
    torch.testing.assert_close(phi, brute, rtol=1e-10, atol=1e-12)
    assert feat._batch_axes == {"mlp": [0], "head": [0]}  # probed on the first batch


class _TwoLayouts(torch.nn.Module):
    """One Linear used batch-first on 9 tokens, then (shared) sequence-first on 6, and once more
    under no_grad (a stop-gradient branch, which takes no part in the gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = torch.nn.Conv2d(3, 4, 4, stride=4)
        self.f = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)  # [N, 9, 4]
        a = torch.tanh(self.f(t))  # batch-first
        b = torch.tanh(self.f(a[:, :6].transpose(0, 1)))  # [6, N, 4]: sequence-first
        with torch.no_grad():
            target = self.f(t).mean()
        return self.head(a.mean(1) + b.mean(0)) + 0 * target


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_batch_dimensions_are_per_call_and_checked_on_later_batches() -> None:
    # B = 3 (rows 9: the first call is ambiguous), then B = 2 (rows 6: the second is) with the
    # same Featurizer: each call keeps its own probed axis; a kept answer is used only while
    # the shape fits it.
    torch.manual_seed(9)
    model = _TwoLayouts().double()
    layout = build_layout(model)
    loss = issl.AugmentationStability(views=2, seed=1, augment=issl.SSLAugment.light(seed=1))
    feat = Featurizer(model, layout, loss, issl.Projection("identity"))
    for batch in (3, 2, 3):
        x, ids = torch.rand(batch, 3, 12, 12, dtype=torch.float64), torch.arange(batch)
        brute = _brute_force_flat_grads(model, layout, loss, x, ids)
        phi, _ = feat(x, ids)
        torch.testing.assert_close(phi, brute, rtol=1e-10, atol=1e-12)
    assert feat._batch_axes["f"] == [0, 1]

    class Table(torch.nn.Module):  # a Linear fed a learned table: not per example
        def __init__(self) -> None:
            super().__init__()
            self.pos = torch.nn.Parameter(torch.randn(6, 4))
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x.reshape(x.shape[0], 6, 4) + self.proj(self.pos)).mean(1)

    model = Table()
    loss = issl.AugmentationStability(views=1, augment=UniformNoise())
    with pytest.raises(ValueError, match="learned table"):
        Featurizer(model, build_layout(model), loss, issl.Projection("identity"))(
            torch.rand(3, 24), torch.arange(3))


@pytest.mark.parametrize("kind", ["identity", "dense", "kron"])
def test_factors_formed_an_example_at_a_time_give_the_batch_features(kind, monkeypatch) -> None:
    # Layers whose factors exceed featurize.FACTOR_CHUNK_BYTES are formed a chunk of examples
    # at a time (here one: a budget of 1 byte): the same features and kron statistics.
    from issl_fast import featurize

    torch.manual_seed(0)
    for model, x in ((small_cnn(), images(5)), (tiny_vit(), images(4, seed=2))):
        loss = issl.AugmentationStability(views=2, seed=1, augment=issl.SSLAugment.light(seed=1))
        layout = build_layout(model)
        proj = issl.Projection(kind, k=64, seed=3)
        feat = Featurizer(model, layout, loss, proj, collect_stats=True)
        ids = torch.arange(x.shape[0])
        whole, stats = feat(x, ids)
        monkeypatch.setattr(featurize, "FACTOR_CHUNK_BYTES", 1)
        chunked, chunked_stats = feat(x, ids)
        monkeypatch.undo()
        if kind == "identity":  # (einsum over a smaller batch may round differently)
            torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-7)
        else:  # the kernels' rows do not depend on the batch
            assert torch.equal(chunked, whole)
        assert stats.keys() == chunked_stats.keys() and (kind != "kron" or stats)
        for key in stats:  # (float32 projections of other batch sizes: rounding)
            torch.testing.assert_close(chunked_stats[key], stats[key], rtol=2e-5, atol=1e-9)


def test_compiled_and_data_parallel_encoders_are_attributed_through_their_module(
        tmp_path) -> None:
    # A wrapper's layers carry a prefix (_orig_mod., module.): unwrapped, the attribution is
    # the plain module's, same layers, fingerprint (a store opens with either) and features.
    import torch.distributed as dist

    model = small_cnn()
    plain = issl.InfluenceSSL(model, projection=issl.Projection("kron", k=16), solver="block")
    x, ids = images(3), torch.arange(3)
    want = plain.features(x, ids)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        wrappers = [torch.compile(model), torch.nn.DataParallel(model),
                    torch.nn.parallel.DistributedDataParallel(model),
                    torch.nn.DataParallel(torch.compile(model))]
        for wrapped in wrappers:
            attr = issl.InfluenceSSL(wrapped, projection=issl.Projection("kron", k=16),
                                     solver="block")
            assert attr.encoder is model
            assert [layer.name for layer in attr.layout.layers] == ["0", "2", "5", "8"]
            assert attr.fingerprint() == plain.fingerprint()
            assert torch.equal(attr.features(x, ids), want)
    finally:
        dist.destroy_process_group()


def test_a_linear_on_rows_not_grouped_by_example_is_an_error() -> None:
    # torch.cat of two calls' rows along the batch: [a_0 .. a_B-1, b_0 .. b_B-1] has two rows
    # per example, but not together; the factors would mix examples (silently wrong before).
    class Concat(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
            self.shared = torch.nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.shared(torch.cat([torch.tanh(self.a(x)), torch.tanh(self.b(x))]))
            return h[: x.shape[0]] + h[x.shape[0]:]

    class Together(Concat):  # the same rows, each example's two together: fine
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pair = torch.stack([torch.tanh(self.a(x)), torch.tanh(self.b(x))], dim=1)
            return self.shared(pair.flatten(0, 1)).unflatten(0, (x.shape[0], 2)).sum(1)

    loss = issl.AugmentationStability(views=1, augment=UniformNoise())
    x, ids = torch.rand(5, 4, dtype=torch.float64), torch.arange(5)
    model = Concat().double()
    with pytest.raises(ValueError, match="'shared': the rows of its input \\(20, 3\\) are not "
                                         "grouped by example"):
        Featurizer(model, build_layout(model), loss, issl.Projection("identity"))(x, ids)
    model = Together().double()
    _assert_identity_exact(model, build_layout(model), loss, x, ids)
