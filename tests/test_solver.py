"""Solvers: EK-FAC and block against explicitly built matrices; damping rules."""

from __future__ import annotations

import pytest
import torch
from engine_models import batches, cnn_attribution, images


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    path = tmp_path_factory.mktemp("solver")
    x = images(40)
    out = {}
    for solver in ("ekfac", "block", "gauss_newton", "identity"):
        attr = cnn_attribution(solver=solver, store_dtype="float32")
        attr.fit(attr.featurize(batches(x, 10), path / solver, progress=False))
        out[solver] = attr
    return out, x


def test_ekfac_equals_explicit_eigenbasis_inverse(fitted) -> None:
    attrs, _ = fitted
    attr = attrs["ekfac"]
    phi = attr.store.load(torch.float64)
    pre = attr.solver.precondition(phi[:5])
    for block, part in attr.solver._parts:
        sl = slice(block.start, block.stop)
        if block.kind != "kron":
            continue
        Q = torch.kron(part.QD, part.QA)  # vec(QD^T M QA) = (QD (x) QA)^T vec(M), row-major vec
        rot = phi[:, sl] @ Q
        eig = (rot**2).mean(dim=0)
        lam = 0.1 * eig.mean()
        assert part.lam == pytest.approx(lam.item(), rel=1e-9)
        F = Q @ torch.diag(eig + lam) @ Q.T
        want = torch.linalg.solve(F, phi[:5, sl].T).T
        torch.testing.assert_close(pre[:, sl], want, rtol=1e-8, atol=1e-10)
    quad = attr.solver.quad(phi[:5])
    torch.testing.assert_close(quad, (pre * phi[:5]).sum(1), rtol=1e-9, atol=0)


def test_block_equals_per_block_gauss_newton(fitted) -> None:
    attrs, _ = fitted
    attr = attrs["block"]
    phi = attr.store.load(torch.float64)
    pre = attr.solver.precondition(phi[:3])
    for block in attr.featurizer.blocks:
        sl = slice(block.start, block.stop)
        F = phi[:, sl].T @ phi[:, sl] / phi.shape[0]
        lam = 0.1 * torch.diagonal(F).mean()
        want = torch.linalg.solve(F + lam * torch.eye(F.shape[0], dtype=F.dtype), phi[:3, sl].T).T
        torch.testing.assert_close(pre[:, sl], want, rtol=1e-7, atol=1e-10)


def test_scores_self_influence_and_topk_are_consistent(fitted) -> None:
    """Per solver: self-influence is the diagonal of the score matrix, the streaming top-k matches
    the full matrix, and in normalised (cosine) form each example is its own best match
    (Cauchy-Schwarz in the F^-1 metric)."""
    attrs, x = fitted
    for name, attr in attrs.items():
        S = attr.score_matrix(x[:4], ids=torch.arange(4))  # [4, 40]
        si = attr.self_influence()
        assert si.shape == (40,) and (si > 0).all(), name
        assert si[:4] == pytest.approx(torch.diagonal(S[:, :4]).numpy(), rel=1e-4), name
        top = attr.score(x[:4], topk=3, ids=torch.arange(4))
        want = torch.sort(S, dim=1, descending=True, stable=True)
        assert torch.equal(top.ids, want.indices[:, :3]), name
        low = attr.score(x[:4], topk=3, ids=torch.arange(4), opponents=True)
        want_low = torch.sort(S, dim=1, descending=False, stable=True)
        assert torch.equal(low.ids, want_low.indices[:, :3]), name
        cos = S / torch.sqrt(torch.outer(torch.from_numpy(si[:4]), torch.from_numpy(si)))
        assert cos.argmax(dim=1).tolist() == [0, 1, 2, 3], name


def test_absolute_damping_is_used_and_reported(tmp_path) -> None:
    attr = cnn_attribution(solver="gauss_newton", absolute_damping=0.25)
    attr.fit(attr.featurize(batches(images(12), 6), tmp_path / "s", progress=False))
    assert attr.solver.damping_used == {"all": 0.25}


def test_ekfac_needs_kron_and_statistics(tmp_path) -> None:
    with pytest.raises(ValueError, match="kron"):
        cnn_attribution(solver="ekfac", kind="dense")
    plain = cnn_attribution(solver="block")
    store = plain.featurize(batches(images(8), 4), tmp_path / "s", progress=False)
    from issl_fast.solver import Solver

    with pytest.raises(ValueError, match="no K-FAC statistics"):
        Solver("ekfac", plain.featurizer.blocks).fit(store)
    with pytest.raises(ValueError, match="solver must be one of"):
        Solver("newton", plain.featurizer.blocks)
    with pytest.raises(RuntimeError, match="fit"):
        Solver("block", plain.featurizer.blocks).precondition(torch.zeros(1, store.dim))
