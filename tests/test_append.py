"""featurize(append=True): a complete store grows by the examples after its own, to the store the
whole data would have given; a complete store met with other data is an error, not stale."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from engine_models import cnn_attribution, images
from issl_fast.store import GradientStore, StoreError
from torch.utils.data import DataLoader, Dataset, SubsetRandomSampler, TensorDataset

N_OLD, N_NEW, BATCH, SHARD = 10, 17, 5, 4


class _Counted(Dataset):
    """The images, counting which indices were loaded."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x, self.loaded = x, []

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        self.loaded.append(i)
        return self.x[i]


def _loader(n: int) -> DataLoader:
    return DataLoader(TensorDataset(images(N_NEW)[:n]), batch_size=BATCH)


def _same_store(a: GradientStore, b: GradientStore, exact: bool = True) -> None:
    """The same rows; ``exact``: made from the same batches, so bit for bit (else a batch was
    cut elsewhere, and convolutions over other batch sizes round differently)."""
    assert a.rows == b.rows and a.complete and b.complete
    np.testing.assert_array_equal(a.ids(), b.ids())
    if exact:
        assert torch.equal(a.load(), b.load())
    else:
        torch.testing.assert_close(a.load(), b.load(), rtol=2e-3, atol=1e-6)
    sa, sb = a.stats(), b.stats()
    assert sa.keys() == sb.keys()
    for key in sa:  # (float32 projections summed in float64; entries near 0 cancel)
        atol = 0.0 if exact else 1e-5 * float(sb[key].abs().max())
        torch.testing.assert_close(sa[key], sb[key], rtol=1e-12 if exact else 1e-4, atol=atol)


def test_append_grows_a_store_to_the_one_of_the_whole_data(tmp_path: Path) -> None:
    attr = cnn_attribution()
    whole = attr.featurize(_loader(N_NEW), tmp_path / "whole", shard_rows=SHARD,
                           progress=False)
    store = attr.featurize(_loader(N_OLD), tmp_path / "s", shard_rows=SHARD, progress=False)
    assert attr.featurize(_loader(N_OLD), tmp_path / "s", progress=False).rows == N_OLD
    with pytest.raises(StoreError, match=f"complete with {N_OLD} examples, but the data have "
                                         f"{N_NEW}: pass append=True"):
        attr.featurize(_loader(N_NEW), tmp_path / "s", progress=False)
    with pytest.raises(StoreError, match="featurize these data into another path"):
        attr.featurize(_loader(N_OLD - 3), tmp_path / "s", progress=False)
    # the stored examples are skipped without being loaded, but for the 4 featurised again
    # to check them (evenly spread, the last one among them)
    counted = _Counted(images(N_NEW))
    store = attr.featurize(DataLoader(counted, batch_size=BATCH), tmp_path / "s",
                           shard_rows=SHARD, progress=False, append=True)
    assert counted.loaded == [0, 3, 6, 9] + list(range(N_OLD, N_NEW))
    _same_store(GradientStore.open(tmp_path / "s"), whole)
    # fitted on the grown store: the curvature of the whole data
    attr.fit(store)
    np.testing.assert_allclose(attr.self_influence(),
                               cnn_attribution().fit(whole).self_influence(), rtol=1e-9)
    # nothing new: the store stays as it is
    again = attr.featurize(_loader(N_NEW), tmp_path / "s", progress=False, append=True)
    assert again.rows == N_NEW and again.complete


def test_append_with_other_or_fewer_examples_leaves_the_store_as_it_was(tmp_path: Path) -> None:
    attr = cnn_attribution()
    attr.featurize(_loader(N_OLD), tmp_path / "s", shard_rows=SHARD, progress=False)
    before = (tmp_path / "s" / "manifest.json").read_text()
    data = TensorDataset(images(N_NEW + 3))
    shifted = DataLoader(data, batch_size=BATCH, sampler=SubsetRandomSampler(range(3, N_NEW + 3)))
    with pytest.raises(StoreError, match="do not come in the order of the store at .*: its row 0 "
                                         "holds example id 0, the data give id 3"):
        attr.featurize(shifted, tmp_path / "s", progress=False, append=True)
    with pytest.raises(StoreError, match=f"the data end after 8 examples, but the store at "
                                         f".* already holds {N_OLD}"):
        attr.featurize(_loader(8), tmp_path / "s", progress=False, append=True)
    assert (tmp_path / "s" / "manifest.json").read_text() == before  # complete, untouched
    # and the writer's lock went with each error: a good append works
    assert attr.featurize(_loader(N_NEW), tmp_path / "s", shard_rows=SHARD, progress=False,
                          append=True).rows == N_NEW


def test_a_crash_while_appending_resumes(tmp_path: Path) -> None:
    attr = cnn_attribution()
    whole = attr.featurize(_loader(N_NEW), tmp_path / "whole", shard_rows=SHARD,
                           progress=False)
    attr.featurize(_loader(N_OLD), tmp_path / "s", shard_rows=SHARD, progress=False)

    def crashing():  # the whole data, failing after the first new batch
        for i, batch in enumerate(_loader(N_NEW)):
            if i * BATCH >= N_OLD + BATCH:
                raise RuntimeError("killed")
            yield batch

    with pytest.raises(RuntimeError, match="killed"):
        attr.featurize(crashing(), tmp_path / "s", shard_rows=SHARD, progress=False,
                       append=True)
    partial = GradientStore.open(tmp_path / "s", require_complete=False)
    assert not partial.complete and N_OLD <= partial.rows < N_NEW
    with pytest.raises(StoreError, match="incomplete"):
        GradientStore.open(tmp_path / "s")
    # an ordinary featurize resumes it (as any incomplete store)
    store = attr.featurize(_loader(N_NEW), tmp_path / "s", shard_rows=SHARD, progress=False)
    _same_store(store, whole, exact=False)


def test_append_must_be_a_bool_and_is_for_one_process(monkeypatch, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="append must be True or False"):
        cnn_attribution().featurize(_loader(3), tmp_path / "x", append=1)  # type: ignore
    import issl_fast as issl

    monkeypatch.setattr(issl.InfluenceSSL, "ranks", property(lambda self: (0, 2)))
    with pytest.raises(ValueError, match="append=True is for one process"):
        cnn_attribution().featurize(_loader(3), tmp_path / "x", append=True)
    assert not (tmp_path / "x").exists()


def test_a_store_whose_ids_are_not_the_loaders_indices_is_not_judged(tmp_path: Path) -> None:
    # A collate function that drops a row (and names the kept ones): the store holds fewer
    # rows than the loader's indices, and a rerun of the same call returns it (review finding:
    # refused as "the data have 12" at first).
    x = images(12)

    class Indexed(Dataset):
        def __len__(self) -> int:
            return 12

        def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
            return i, x[i]

    def drop_3(items: list) -> dict:
        kept = [(i, t) for i, t in items if i != 3]
        return {"x": torch.stack([t for _, t in kept]), "ids": torch.tensor([i for i, _ in kept])}

    loader = DataLoader(Indexed(), batch_size=5, collate_fn=drop_3)
    attr = cnn_attribution()
    assert attr.featurize(loader, tmp_path / "s", shard_rows=SHARD, progress=False).rows == 11
    assert attr.featurize(loader, tmp_path / "s", shard_rows=SHARD, progress=False).rows == 11


def test_an_append_that_fails_before_a_new_shard_leaves_the_store_complete(
        tmp_path: Path, monkeypatch) -> None:
    from issl_fast.featurize import Featurizer

    attr = cnn_attribution()
    attr.featurize(_loader(N_OLD), tmp_path / "s", shard_rows=SHARD, progress=False)
    before = (tmp_path / "s" / "manifest.json").read_text()
    real = Featurizer.__call__
    calls = []

    def failing(self, x, ids):  # the model fails on the second new batch (no shard written)
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("out of memory")
        return real(self, x, ids)

    monkeypatch.setattr(Featurizer, "__call__", failing)
    with pytest.raises(MemoryError):
        attr.featurize(_loader(N_OLD + 2 * BATCH), tmp_path / "s", shard_rows=2 * BATCH,
                       progress=False, append=True)
    assert (tmp_path / "s" / "manifest.json").read_text() == before
    assert GradientStore.open(tmp_path / "s").rows == N_OLD  # complete, usable as it was


def test_appended_shards_take_the_new_shard_size_and_resume_with_the_same_call(
        tmp_path: Path) -> None:
    # (review finding: a crashed append with the default shard_rows could not be resumed by the
    # call that started it, the store keeping the size it was made with)
    attr = cnn_attribution()
    attr.featurize(_loader(N_OLD), tmp_path / "s", shard_rows=3, progress=False)

    def crashing():
        for i, batch in enumerate(_loader(N_NEW)):
            if i == 3:
                raise RuntimeError("killed")
            yield batch

    with pytest.raises(RuntimeError, match="killed"):
        attr.featurize(crashing(), tmp_path / "s", shard_rows=SHARD, progress=False,
                       append=True)
    store = attr.featurize(list(_loader(N_NEW)), tmp_path / "s", shard_rows=SHARD,
                           progress=False, append=True)
    assert store.rows == N_NEW and store.shard_rows == SHARD
    sizes = [sh["rows"] for sh in store._m["shards"]]
    assert sizes[:4] == [3, 3, 3, 1] and all(s <= SHARD for s in sizes[4:])
