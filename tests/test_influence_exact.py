"""Exactness of Influence-SSL on a tiny float64 MLP: with the identity projection and the
Gauss-Newton solver, scores equal g_t^T (GN + lambda I)^-1 g_i from an explicit GN matrix."""

from __future__ import annotations

import issl_fast as issl
import numpy as np
import pytest
import torch
from engine_models import UniformNoise, batches, tiny_mlp64
from torch.func import functional_call, grad

N_TRAIN = 30
# float64 end to end: only rounding of a few hundred-term sums separates the two computations.
EXACT_RTOL = 1e-6


def _explicit_grads(model, loss, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per-example flat gradients [n, P] in issl_fast's layout ([W | b] row-major per layer)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, inputs):
        return loss.from_outputs(functional_call(model, p, (inputs,)), 1).sum()

    rows = []
    for i in range(x.shape[0]):
        g = grad(one)(params, loss.encoder_inputs(x[i : i + 1], ids[i : i + 1]))
        parts = []
        for name, mod in model.named_children():
            if isinstance(mod, torch.nn.Linear):
                parts.append(
                    torch.cat([g[f"{name}.weight"], g[f"{name}.bias"][:, None]], 1).reshape(-1)
                )
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def _setup(tmp_path, damping_kw):
    model = tiny_mlp64()
    loss = issl.AugmentationStability(views=3, augment=UniformNoise())
    attr = issl.InfluenceSSL(
        model,
        loss,
        issl.Projection("identity"),
        "gauss_newton",
        store_dtype="float64",
        **damping_kw,
    )
    x = torch.randn(N_TRAIN, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    store = attr.featurize(batches(x, 7), tmp_path / "store", progress=False)
    attr.fit(store)
    G = _explicit_grads(model, loss, x, torch.arange(N_TRAIN))
    return attr, x, G


@pytest.mark.parametrize(
    "damping_kw", [{"absolute_damping": 1e-3}, {}], ids=["absolute", "relative"]
)
def test_identity_gauss_newton_matches_explicit(tmp_path, damping_kw) -> None:
    attr, x, G = _setup(tmp_path, damping_kw)
    assert attr.dim == G.shape[1]
    GN = G.T @ G / N_TRAIN
    lam = damping_kw.get("absolute_damping", 0.1 * float(torch.diagonal(GN).mean()))
    assert attr.solver.damping_used["all"] == pytest.approx(lam, rel=1e-12)
    H = GN + lam * torch.eye(G.shape[1], dtype=torch.float64)
    exact = G[:5] @ torch.linalg.solve(H, G.T)  # queries = the first 5 training examples
    ours = attr.score_matrix(x[:5], ids=torch.arange(5))
    assert ((ours - exact).abs().max() / exact.abs().max()).item() < EXACT_RTOL
    exact_self = torch.einsum("ij,ji->i", G, torch.linalg.solve(H, G.T)).numpy()
    ours_self = attr.self_influence()
    assert np.abs(ours_self - exact_self).max() / np.abs(exact_self).max() < EXACT_RTOL
    assert (ours_self > 0).all()
    # top-k through the streaming kernel agrees with the full matrix
    top = attr.score(x[:5], topk=4, ids=torch.arange(5))
    want = torch.sort(exact, dim=1, descending=True, stable=True)
    assert torch.equal(top.ids, want.indices[:, :4])
    torch.testing.assert_close(top.values.double(), want.values[:, :4], rtol=1e-5, atol=1e-9)
    # F is the mean loss's curvature: I_up,loss = -score, leaving out = score / n
    torch.testing.assert_close(top.koh_liang(), -top.values)
    torch.testing.assert_close(top.removal_effect(), top.values / N_TRAIN)
    # with the self-influences: the exact leave-one-out change of the quadratic model, t's
    # gradient against the Newton step of the mean loss without i (F minus i's own term)
    loo = torch.empty(5, 4, dtype=torch.float64)
    for q in range(5):
        for j, i in enumerate(top.rows[q].tolist()):
            without = H - torch.outer(G[i], G[i]) / N_TRAIN
            loo[q, j] = G[q] @ torch.linalg.solve(without, G[i]) / N_TRAIN
    got = top.removal_effect(ours_self)
    torch.testing.assert_close(got.double(), loo, rtol=1e-5, atol=1e-9)
    # (a difference the first-order value misses: with the relative damping, examples of high
    # leverage, s_i / n near 1, change by ~36x the first-order value; ~1.0005x at 1e-3)
    if not damping_kw:
        assert float((loo / (top.values.double() / N_TRAIN)).max()) > 10
    with pytest.raises(ValueError, match=r"self_influence must be \[n\] = \[30\]"):
        top.removal_effect(ours_self[:-1])


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_dense_projection_correlates_with_exact(tmp_path) -> None:
    model = tiny_mlp64()
    loss = issl.AugmentationStability(views=3, augment=UniformNoise())
    x = torch.randn(N_TRAIN, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    lam = {"absolute_damping": 1e-4}
    exact_attr = issl.InfluenceSSL(
        model, loss, issl.Projection("identity"), "gauss_newton", store_dtype="float64", **lam
    )
    exact_attr.fit(exact_attr.featurize(batches(x, 10), tmp_path / "exact", progress=False))
    sk = issl.InfluenceSSL(
        model,
        loss,
        issl.Projection("dense", k=2048, seed=7),
        "gauss_newton",
        store_dtype="float32",
        **lam,
    )
    sk.fit(sk.featurize(batches(x, 10), tmp_path / "dense", progress=False))
    q = x[:6]
    a = exact_attr.score_matrix(q, ids=torch.arange(6)).numpy().ravel()
    b = sk.score_matrix(q, ids=torch.arange(6)).numpy().ravel()
    assert _spearman(a, b) >= 0.9


@pytest.mark.parametrize("solver", ["block", "ekfac", "identity"])
def test_the_leverage_correction_is_refused_where_f_loses_no_rank_one_term(
        tmp_path, solver) -> None:
    # block / EK-FAC: each block holds its own leverage (their sum exceeds n here); identity: no
    # example's term in F at all. The first-order removal effect stays available.
    model = tiny_mlp64()
    loss = issl.AugmentationStability(views=3, augment=UniformNoise())
    proj = issl.Projection("kron", k=16) if solver == "ekfac" else issl.Projection("identity")
    attr = issl.InfluenceSSL(model, loss, proj, solver, store_dtype="float64",
                             damping=np.float32(0.1))
    x = torch.randn(N_TRAIN, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    attr.fit(attr.featurize(batches(x, 7), tmp_path / "store", progress=False))
    assert type(attr.solver.damping) is float  # (a numpy damping is kept as a plain float)
    top = attr.score(x[:3], topk=2)
    assert top.solver == solver
    torch.testing.assert_close(top.removal_effect(), top.values / N_TRAIN)
    with pytest.raises(ValueError, match=rf"solver='gauss_newton' only \(these scores used "
                                         rf"'{solver}'"):
        top.removal_effect(attr.self_influence())
