"""An exact duplicate of a training example has normalised (cosine) influence >= 0.99 with it."""

from __future__ import annotations

import numpy as np
import torch
from engine_models import batches, cnn_attribution, images


def test_exact_duplicate_has_normalised_influence_one(tmp_path) -> None:
    x = images(30)
    attr = cnn_attribution(solver="ekfac")
    store = attr.featurize(batches(x, 8), tmp_path / "s", progress=False)
    attr.fit(store)
    s_train = attr.self_influence()
    dup = [4, 17, 29]
    query = x[dup].clone()  # the same images, presented with the same example ids
    q_ids = torch.tensor(dup)
    scores = attr.score_matrix(query, ids=q_ids).numpy()  # [3, 30]
    phi_q = attr.features(query, q_ids)
    s_q = attr.solver.quad(phi_q).numpy()
    cos = scores / np.sqrt(np.outer(s_q, s_train))
    np.testing.assert_allclose(attr.score_matrix(query, ids=q_ids, normalised=True).numpy(), cos,
                               rtol=1e-10)
    for row, i in enumerate(dup):
        assert cos[row, i] >= 0.99
        assert np.argmax(cos[row]) == i
        others = np.delete(cos[row], i)
        assert others.max() < cos[row, i]
