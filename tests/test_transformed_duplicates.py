"""Transform-tolerant duplicate search: translations, neighbour merging, transformed queries."""

from __future__ import annotations

import dataclasses

import issl_fast as issl
import numpy as np
import pytest
import torch
from engine_models import images, small_cnn
from issl_fast import apps
from issl_fast.projection import Block
from issl_fast.solver import Solver
from issl_fast.store import GradientStore

DIM = 12


def test_translation_moves_pixels_and_blanks_the_uncovered_edge() -> None:
    x = torch.arange(1, 2 * 4 * 5 + 1, dtype=torch.float32).reshape(2, 4, 5)
    down = apps.Translation(1, 0)(x)
    assert torch.equal(down[:, 1:], x[:, :-1]) and torch.all(down[:, 0] == 0)
    left = apps.Translation(0, -2, fill=-1.0)(x)
    assert torch.equal(left[..., :3], x[..., 2:]) and torch.all(left[..., 3:] == -1.0)
    both = apps.Translation(-1, 1)(x)
    assert torch.equal(both[:, :-1, 1:], x[:, 1:, :-1])
    assert both[:, -1].abs().sum() == 0 and both[..., 0].abs().sum() == 0
    # Undoing a shift loses only the edge that left the image.
    back = apps.Translation(-1, 0)(down)
    assert torch.equal(back[:, :-1], x[:, :-1]) and torch.all(back[:, -1] == 0)


def test_translation_errors_and_the_standard_sets() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        apps.Translation(4, 0)(torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match=r"\[\.\.\., H, W\]"):
        apps.Translation(1, 0)(torch.zeros(5))
    with pytest.raises(ValueError, match="pixels"):
        apps.translations(0)
    one = apps.translations(1)
    assert {(t.dy, t.dx) for t in one} == {(1, 0), (-1, 0), (0, 1), (0, -1)}
    assert len(apps.translations(2)) == 8 and len(apps.translations(1, diagonal=True)) == 8
    assert "dy=+1" in one[0].name


def test_signal_shifts_move_samples_fill_or_wrap() -> None:
    x = torch.arange(1.0, 6.0).expand(2, 1, 5)  # [B, C, L]
    assert apps.Shift(2)(x)[0, 0].tolist() == [0, 0, 1, 2, 3]
    assert apps.Shift(-1, fill=-1.0)(x)[1, 0].tolist() == [2, 3, 4, 5, -1]
    assert torch.equal(apps.Shift(-2, circular=True)(x), torch.roll(x, -2, dims=-1))
    with pytest.raises(ValueError, match="does not fit signals of length 5"):
        apps.Shift(5)(x)
    with pytest.raises(ValueError, match="samples must be an int >= 1"):
        apps.shifts(0)
    assert [t.samples for t in apps.shifts(2)] == [1, -1, 2, -2]
    assert apps.shifts(1, circular=True)[1].name == "shift(-1, circular)"


def test_merge_neighbours_keeps_each_row_once_at_its_best() -> None:
    a = (np.array([[0.9, 0.5, 0.1], [0.7, -np.inf, -np.inf]], dtype=np.float32),
         np.array([[3, 4, 5], [2, -1, -1]]))
    b = (np.array([[0.95, 0.5], [0.2, 0.1]], dtype=np.float32), np.array([[4, 1], [2, 0]]))
    v, i = apps.merge_neighbours(a, b)
    assert i.tolist() == [[4, 3, 1], [2, 0, -1]]  # 4 at its better 0.95; 5 (0.1) drops out
    np.testing.assert_array_equal(v, np.array([[0.95, 0.9, 0.5], [0.7, 0.1, -np.inf]],
                                              dtype=np.float32))
    with pytest.raises(ValueError, match="matching"):
        apps.merge_neighbours(a, (np.zeros((3, 2), np.float32), np.zeros((3, 2), np.int64)))
    with pytest.raises(ValueError, match="at least one"):
        apps.merge_neighbours()


def test_merge_neighbours_ties_rank_the_lower_row_first() -> None:
    v, i = apps.merge_neighbours((np.array([[0.5, 0.5]], np.float32), np.array([[7, 2]])),
                                 (np.array([[0.5]], np.float32), np.array([[4]])))
    assert i.tolist() == [[2, 4]] and v.tolist() == [[0.5, 0.5]]


@pytest.fixture()
def store_and_solver(tmp_path):
    gen = torch.Generator().manual_seed(4)
    phi = torch.randn(40, DIM, generator=gen)
    store = GradientStore.create_or_resume(tmp_path / "s", {"t": 1}, DIM, "float32", 16)
    store.append(phi, torch.arange(40))
    store.finalize()
    solver = Solver("gauss_newton", [Block("all", 0, DIM, "dense")], absolute_damping=0.5)
    return store, solver.fit(store), phi


def test_transformed_neighbours_match_brute_force(store_and_solver) -> None:
    store, solver, phi = store_and_solver
    gen = torch.Generator().manual_seed(5)
    q_phi = phi + 0.3 * torch.randn(phi.shape, generator=gen)  # "features of t(x_i)"
    rows = torch.arange(40).flip(0)  # any order, in batches of 7
    q_in = q_phi[rows]
    batches = [(q_in[s:s + 7], rows[s:s + 7]) for s in range(0, 40, 7)]
    sim, nbr = apps.transformed_neighbours(store, solver, batches, topk=3)
    p, q = phi.double(), q_phi.double()
    pre = solver.precondition(q)
    s_q = (pre * q).sum(1)
    s_p = solver.quad(p)
    cos = (pre @ p.T) / torch.sqrt(torch.outer(s_q, s_p))
    cos.fill_diagonal_(-torch.inf)  # a copy never matches its own row
    want = torch.sort(cos, dim=1, descending=True, stable=True)
    assert np.array_equal(nbr, want.indices[:, :3].numpy())
    np.testing.assert_allclose(sim, want.values[:, :3].numpy(), rtol=1e-5, atol=1e-6)


def test_transformed_neighbours_single_rows_and_repeated_rows(store_and_solver) -> None:
    store, solver, phi = store_and_solver
    gen = torch.Generator().manual_seed(6)
    # One row alone (a numpy feature row is accepted too).
    sim1, nbr1 = apps.transformed_neighbours(store, solver, [(phi[5:6].numpy(), [0])], topk=2)
    assert nbr1[0, 0] == 5 and sim1[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert np.all(nbr1[1:] == -1) and np.all(np.isneginf(sim1[1:]))
    # Row 0 met twice in one batch: the copy identical to row 5 wins, whatever the order.
    noise = torch.randn(1, DIM, generator=gen)
    for batch in ([(phi[5:6], [0]), (noise, [0])], [(noise, [0]), (phi[5:6], [0])]):
        _, nbr = apps.transformed_neighbours(store, solver, batch, topk=2)
        assert nbr[0, 0] == 5


def test_transformed_neighbours_reject_bad_queries(store_and_solver) -> None:
    store, solver, phi = store_and_solver
    with pytest.raises(ValueError, match=r"\[2, 12\]"):
        apps.transformed_neighbours(store, solver, [(phi[:2, :5], torch.tensor([0, 1]))], 2)
    with pytest.raises(ValueError, match="store rows"):
        apps.transformed_neighbours(store, solver, [(phi[:1], torch.tensor([40]))], 2)


def test_influence_finds_a_shifted_copy_only_with_translations(tmp_path) -> None:
    x = images(24)
    x[20] = apps.Translation(0, 1)(x[7])
    # Shared views: an image's views depend on its content only, not on its id.
    aug = dataclasses.replace(issl.SSLAugment.light(seed=5), shared=True)
    loss = issl.AugmentationStability(views=2, augment=aug)
    attr = issl.InfluenceSSL(small_cnn(), loss, issl.Projection("kron", k=64, seed=3), "ekfac")
    data = [(x[i:i + 8],) for i in range(0, 24, 8)]
    attr.fit(attr.featurize(data, tmp_path / "s", progress=False))

    plain = attr.find_duplicates(threshold=-1.0, topk=3)
    plain_sim = {tuple(r): s for r, s in zip(plain.rows.tolist(), plain.similarity)}
    assert plain_sim.get((7, 20), -1.0) < 0.9
    found = attr.find_duplicates(threshold=0.99, topk=3, data=data,
                                 transforms=apps.translations(1))
    assert found.rows.tolist() == [[7, 20]]
    assert found.similarity[0] == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="data="):
        attr.neighbours(3, transforms=apps.translations(1))
    with pytest.raises(TypeError, match="re-iterable"):
        attr.neighbours(3, data=(b for b in data), transforms=apps.translations(1))
    with pytest.raises(ValueError, match="not both"):
        attr.find_duplicates(0.9, neighbours=attr.neighbours(3), data=data,
                             transforms=apps.translations(1))
    strangers = [{"x": x[:4], "ids": torch.arange(100, 104)}]
    with pytest.raises(ValueError, match="ids the store does not"):
        attr.neighbours(3, data=strangers, transforms=apps.translations(1))
