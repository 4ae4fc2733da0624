"""The applications on synthetic features with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from issl_fast import apps, residency
from issl_fast.projection import Block
from issl_fast.solver import Solver
from issl_fast.store import GradientStore

DIM = 24


@pytest.fixture()
def synthetic(tmp_path):
    """60 random rows in the first 20 dims; row 17 = row 5 (exact), row 9 = row 3 + 1e-3 noise
    (near); rows 40-42 get a huge component in a dimension nobody else uses (outliers)."""
    gen = torch.Generator().manual_seed(0)
    phi = torch.zeros(60, DIM)
    phi[:, :20] = torch.randn(60, 20, generator=gen)
    phi[17] = phi[5]
    phi[9] = phi[3] + 1e-3 * torch.randn(DIM, generator=gen)
    for j, r in enumerate((40, 41, 42)):
        phi[r] = 0.1 * phi[r]
        phi[r, 20 + j] = 25.0  # a direction nobody else uses, with a large gradient
    store = GradientStore.create_or_resume(tmp_path / "s", {"synthetic": 1}, DIM, "float32", 16)
    store.append(phi, torch.arange(100, 160))
    store.finalize()
    return store, phi


def _solver(kind: str, store: GradientStore) -> Solver:
    return Solver(kind, [Block("all", 0, DIM, "dense")], absolute_damping=1.0).fit(store)


@pytest.mark.parametrize("kind", ["identity", "gauss_newton"])
def test_find_duplicates_returns_the_planted_pairs_first(synthetic, kind) -> None:
    store, _ = synthetic
    pairs = apps.find_duplicates(store, _solver(kind, store), threshold=0.99, topk=3)
    assert pairs.rows.tolist() == [[5, 17], [3, 9]]  # exact (1.0) before near
    assert pairs.ids.tolist() == [[105, 117], [103, 109]]
    assert pairs.similarity[0] == pytest.approx(1.0, abs=1e-5)
    assert 0.99 <= pairs.similarity[1] < pairs.similarity[0]
    everything = apps.find_duplicates(store, _solver(kind, store), threshold=-1.0, topk=3)
    assert len(everything) > 2 and np.all(np.diff(everything.similarity) <= 0)
    assert all(a < b for a, b in everything.rows.tolist())


def test_normalised_neighbours_match_brute_force(synthetic) -> None:
    store, phi = synthetic
    solver = _solver("gauss_newton", store)
    sim, rows = apps.normalised_neighbours(store, solver, topk=4)
    p64 = phi.double()
    pre = solver.precondition(p64)
    s = (pre * p64).sum(1)
    cos = (pre @ p64.T) / torch.sqrt(torch.outer(s, s))
    cos.fill_diagonal_(-torch.inf)
    want = torch.sort(cos, dim=1, descending=True, stable=True)
    assert np.array_equal(rows, want.indices[:, :4].numpy())
    np.testing.assert_allclose(sim, want.values[:, :4].numpy(), rtol=1e-5, atol=1e-6)


def test_find_outliers_by_self_influence_and_by_neighbours(synthetic) -> None:
    store, _ = synthetic
    solver = _solver("identity", store)
    s = solver.quad(store.load(torch.float64)).numpy()
    by_self = apps.find_outliers(s, store.ids(), normalisation=None)
    assert set(by_self.top(3).tolist()) == {40, 41, 42}
    assert by_self.ids[:3].tolist() == (by_self.top(3) + 100).tolist()
    sim, _ = apps.normalised_neighbours(store, solver, topk=2)
    by_neigh = apps.find_outliers(apps.neighbour_scores(sim, 2))
    assert set(by_neigh.top(3).tolist()) == {40, 41, 42}
    # normalisations are monotone: same ranking
    for how in ("zscore", "robust", "rank"):
        assert np.array_equal(apps.find_outliers(s, normalisation=how).order, by_self.order)
    with pytest.raises(ValueError, match="normalisation"):
        apps.find_outliers(s, normalisation="minmax")


def test_group_influence_matches_direct_computation(synthetic) -> None:
    store, phi = synthetic
    solver = _solver("gauss_newton", store)
    s = solver.quad(phi.double()).numpy()
    labels = np.array(["a", "b", "c"] * 20)
    q = solver.precondition(phi[:10].double()).float()
    tl = np.array(["x", "y"] * 5)
    res = apps.group_influence(store, s, labels, preconditioned_queries=q, test_groups=tl,
                               n_boot=200, seed=1)
    assert res.groups == ["a", "b", "c"] and res.test_groups == ["x", "y"]
    for gi, g in enumerate(res.groups):
        sel = labels == g
        assert res.self_mean[gi] == pytest.approx(s[sel].mean())
        assert res.self_median[gi] == pytest.approx(np.median(s[sel]))
        assert res.self_ci[gi, 0] <= res.self_mean[gi] <= res.self_ci[gi, 1]
    scores = (q.double() @ phi.double().T).numpy()  # [10, 60]
    for ti, t in enumerate(res.test_groups):
        for gi, g in enumerate(res.groups):
            want = scores[np.ix_(tl == t, labels == g)].mean()
            assert res.cross[ti, gi] == pytest.approx(want, rel=1e-9, abs=1e-12)
            lo, hi = res.cross_ci[ti, gi]
            assert lo <= res.cross[ti, gi] <= hi and hi > lo
    again = apps.group_influence(store, s, labels, preconditioned_queries=q, test_groups=tl,
                                 n_boot=200, seed=1)
    np.testing.assert_array_equal(again.cross_ci, res.cross_ci)
    with pytest.raises(ValueError, match="train_groups"):
        apps.group_influence(store, s, labels[:5])


@pytest.mark.parametrize("kind", ["identity", "gauss_newton"])
def test_resident_and_streamed_scans_agree(synthetic, monkeypatch, kind) -> None:
    # The normalised store is held whole when it fits the budget, else re-normalised chunk by
    # chunk (16-row shards here) on every pass: the same neighbours either way.
    store, _ = synthetic
    solver = _solver(kind, store)
    resident = apps.normalised_neighbours(store, solver, topk=5)
    assert apps.duplicates._NormalisedStore(store, torch.ones(60), None, None).resident is not None
    monkeypatch.setattr(residency, "RESIDENT_CPU_BYTES", 0)
    scan = apps.duplicates._NormalisedStore(store, torch.ones(60), None, None)
    assert scan.resident is None
    streamed = apps.normalised_neighbours(store, solver, topk=5)
    np.testing.assert_array_equal(resident[1], streamed[1])
    np.testing.assert_allclose(resident[0], streamed[0], rtol=1e-6, atol=1e-7)
