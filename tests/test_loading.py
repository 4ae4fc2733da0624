"""How data is read (issl_fast.loading): a DataLoader's examples are named by dataset index, a
shuffling one is read in index order, and a resumed featurisation checks (and, for a re-made
loader, skips without loading) the examples the store already holds."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import issl_fast as issl
import numpy as np
import pytest
import torch
from engine_models import batches, cnn_attribution, images
from issl_fast import loading
from issl_fast.store import GradientStore, StoreError
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    RandomSampler,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)

N, BATCH, SHARD = 23, 4, 8  # a last short batch; shards end inside batches


class Counted(TensorDataset):
    """Records the indices it loads; raises at ``fail_at`` (a crash mid-featurize)."""

    def __init__(self, x: torch.Tensor, fail_at: int | None = None) -> None:
        super().__init__(x)
        self.read: list[int] = []
        self.fail_at = fail_at

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        if i == self.fail_at:
            raise RuntimeError("disk on fire")
        self.read.append(int(i))
        return super().__getitem__(i)


# Features of other batch compositions differ by float32 rounding, then by float16 rounding
# in the store (2^-11 relative): compared per row, relative to the row's norm.
ROW_RTOL = 1e-3


def _assert_rows_close(got: torch.Tensor, want: torch.Tensor) -> None:
    err = (got - want).norm(dim=1) / want.norm(dim=1)
    assert err.max() <= ROW_RTOL, f"row {int(err.argmax())}: relative error {err.max():.2e}"


def _shards(path: Path) -> list[dict]:
    return json.loads((path / "manifest.json").read_text())["shards"]


def test_a_shuffling_loader_is_read_in_index_order_with_dataset_ids(tmp_path: Path) -> None:
    attr = cnn_attribution()
    plain = attr.featurize(DataLoader(TensorDataset(images(N)), batch_size=BATCH),
                           tmp_path / "plain", shard_rows=SHARD, progress=False)
    shuffled = attr.featurize(DataLoader(TensorDataset(images(N)), batch_size=BATCH,
                                         shuffle=True, drop_last=True),
                              tmp_path / "shuffled", shard_rows=SHARD, progress=False)
    assert shuffled.ids().tolist() == list(range(N))  # every example, drop_last not applied
    assert _shards(tmp_path / "shuffled") == _shards(tmp_path / "plain")  # same bytes
    assert plain.rows == N


def test_a_subset_random_sampler_gives_its_indices_in_order(tmp_path: Path) -> None:
    subset = [17, 3, 9, 20, 0, 11, 5]
    loader = DataLoader(TensorDataset(images(N)), batch_size=3,
                        sampler=SubsetRandomSampler(subset))
    store = cnn_attribution().featurize(loader, tmp_path / "s", progress=False)
    assert store.ids().tolist() == sorted(subset)
    want = cnn_attribution().features(images(N)[sorted(subset)], torch.tensor(sorted(subset)))
    _assert_rows_close(store.load(), want)


def test_a_sampler_of_its_own_keeps_its_order_and_names_examples_by_index(tmp_path: Path
                                                                         ) -> None:
    order = [5, 1, 22, 7, 0, 13]
    loader = DataLoader(TensorDataset(images(N)), batch_size=4, sampler=order)
    store = cnn_attribution().featurize(loader, tmp_path / "s", progress=False)
    assert store.ids().tolist() == order
    want = cnn_attribution().features(images(N)[order], torch.tensor(order))
    _assert_rows_close(store.load(), want)


def test_samplers_that_repeat_or_draw_random_subsets_are_refused(tmp_path: Path) -> None:
    ds = TensorDataset(images(N))
    attr = cnn_attribution()
    cases = [
        (DataLoader(ds, batch_size=4, sampler=RandomSampler(ds, replacement=True)),
         "draws with replacement"),
        (DataLoader(ds, batch_size=4, sampler=RandomSampler(ds, num_samples=10)),
         "draws 10 of 23 examples"),
        (DataLoader(ds, batch_size=4, sampler=WeightedRandomSampler([1.0] * N, 5,
                                                                    replacement=False)),
         "WeightedRandomSampler draws by weight: another set"),
        (DataLoader(ds, batch_size=4, sampler=[1, 2, 3, 2]), r"indices \[2\] more than once"),
    ]
    for i, (loader, message) in enumerate(cases):
        with pytest.raises(ValueError, match=message):
            attr.featurize(loader, tmp_path / f"s{i}", progress=False)
        assert not (tmp_path / f"s{i}").exists()  # refused before the store is made


def test_a_collate_function_that_drops_rows_is_an_error_naming_it(tmp_path: Path) -> None:
    def drop_first(items: list) -> torch.Tensor:
        return torch.stack([x for (x,) in items[1:]])

    loader = DataLoader(TensorDataset(images(N)), batch_size=4, collate_fn=drop_first)
    with pytest.raises(ValueError, match="3 rows for 4 sampled dataset indices.*collate_fn"):
        cnn_attribution().featurize(loader, tmp_path / "s", progress=False)
    # wrapped, it is numbered by position instead
    store = cnn_attribution().featurize((b for b in loader), tmp_path / "w", progress=False)
    assert store.ids().tolist() == list(range(store.rows))


def test_a_shuffling_loader_subclass_is_read_as_it_is_with_a_warning() -> None:
    class Mine(DataLoader):
        pass

    loader = Mine(TensorDataset(images(N)), batch_size=4, shuffle=True)
    examples = loading.Examples(loader)
    assert examples.batches is None
    with pytest.warns(UserWarning, match="shuffles and is read as it is"):
        list(examples)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unshuffled subclass: no warning
        list(loading.Examples(Mine(TensorDataset(images(N)), batch_size=4)))


def test_resume_skips_the_stored_examples_without_loading_them(tmp_path: Path) -> None:
    attr = cnn_attribution()
    path = tmp_path / "s"
    crashing = Counted(images(N), fail_at=19)
    with pytest.raises(RuntimeError, match="disk on fire"):
        attr.featurize(DataLoader(crashing, batch_size=BATCH, shuffle=True), path,
                       shard_rows=SHARD, progress=False)
    done = GradientStore.open(path, require_complete=False).rows
    assert done == 16  # two shards durable; the batch of rows 16-19 failed
    again = Counted(images(N))
    store = attr.featurize(DataLoader(again, batch_size=BATCH, shuffle=True), path,
                           shard_rows=SHARD, progress=False)
    # nothing stored was loaded again, but for the 4 featurised again to check them
    assert again.read == [0, 5, 10, 15] + list(range(done, N))
    clean = attr.featurize(DataLoader(TensorDataset(images(N)), batch_size=BATCH),
                           tmp_path / "clean", shard_rows=SHARD, progress=False)
    assert store.complete and _shards(path) == _shards(tmp_path / "clean")
    assert clean.rows == N


def test_resume_with_data_in_another_order_is_refused_and_keeps_the_store(tmp_path: Path
                                                                         ) -> None:
    attr = cnn_attribution()
    path = tmp_path / "s"
    x = images(N)
    with pytest.raises(RuntimeError, match="disk on fire"):  # a crash after one shard
        attr.featurize(DataLoader(Counted(x, fail_at=SHARD + 1), batch_size=BATCH), path,
                       shard_rows=SHARD, progress=False)
    before = _shards(path)
    assert len(before) == 1
    reversed_order = list(range(N))[::-1]
    for data in (DataLoader(TensorDataset(x), batch_size=BATCH, sampler=reversed_order),
                 [{"x": x[i:i + BATCH], "ids": torch.arange(i, min(N, i + BATCH)) + 100}
                  for i in range(0, N, BATCH)]):
        with pytest.raises(StoreError, match="row 0 holds example id 0, the data give id"):
            attr.featurize(data, path, shard_rows=SHARD, progress=False)
        assert _shards(path) == before  # nothing written, nothing lost
    resumed = attr.featurize(DataLoader(TensorDataset(x), batch_size=BATCH), path,
                             shard_rows=SHARD, progress=False)
    clean = attr.featurize(batches(x, BATCH), tmp_path / "clean", shard_rows=SHARD,
                           progress=False)
    assert resumed.complete and _shards(path) == _shards(tmp_path / "clean")
    assert clean.rows == N


def test_after_cuts_inside_a_batch_and_checks_dict_ids() -> None:
    x = images(N)
    dict_data = [{"x": x[i:i + BATCH], "ids": torch.arange(i, min(N, i + BATCH)) * 3}
                 for i in range(0, N, BATCH)]
    for data, ids in ((DataLoader(TensorDataset(x), batch_size=BATCH), np.arange(N)),
                      (batches(x, BATCH), np.arange(N)),
                      (dict_data, np.arange(N) * 3)):
        pieces = list(loading.Examples(data).after(7, ids, "here"))
        assert pieces[0][2] == 7 and pieces[0][0].shape[0] == 1  # the rest of batch 4-7
        got = torch.cat([p[0] for p in pieces])
        torch.testing.assert_close(got, x[7:], rtol=0, atol=0)
        assert torch.cat([p[1] for p in pieces]).tolist() == ids[7:].tolist()
    with pytest.raises(StoreError, match="row 1 holds example id 1, the data give id 3"):
        list(loading.Examples(dict_data).after(7, np.arange(N), "here"))


def test_shuffled_queries_and_neighbour_data_are_read_by_dataset_index(tmp_path: Path) -> None:
    attr = cnn_attribution()
    x = images(N)
    attr.featurize(DataLoader(TensorDataset(x), batch_size=BATCH, shuffle=True),
                   tmp_path / "s", shard_rows=SHARD, progress=False)
    attr.fit()
    shifts = issl.apps.translations(1)
    want = attr.neighbours(3, data=DataLoader(TensorDataset(x), batch_size=BATCH),
                           transforms=shifts)
    got = attr.neighbours(3, data=DataLoader(TensorDataset(x), batch_size=5, shuffle=True),
                          transforms=shifts)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    test = images(9, seed=4)
    top = attr.score(DataLoader(TensorDataset(test), batch_size=2, shuffle=True), topk=4)
    assert top.query_ids is not None and top.query_ids.tolist() == list(range(9))
    direct = attr.score(test, topk=4)
    torch.testing.assert_close(top.ids, direct.ids, rtol=0, atol=0)
    torch.testing.assert_close(top.values, direct.values, rtol=1e-3, atol=0)  # other batches


def test_batch_samplers_drop_last_and_complete_stores(tmp_path: Path) -> None:
    ds = TensorDataset(images(N))
    # a BatchSampler over a RandomSampler given as batch_sampler: index order too
    shuffling = DataLoader(ds, batch_sampler=BatchSampler(RandomSampler(ds), 4, drop_last=True))
    assert np.concatenate(loading.index_batches(shuffling)).tolist() == list(range(N))
    # drop_last is not applied: every example of the set
    plain = DataLoader(ds, batch_size=4, drop_last=True)
    assert np.concatenate(loading.index_batches(plain)).tolist() == list(range(N))
    # a finished store is returned without reading (or judging the sampler of) the data: only
    # a DataLoader's length is compared with it (tests/test_append.py)
    attr = cnn_attribution()
    store = attr.featurize(plain, tmp_path / "s", progress=False)
    again = attr.featurize(DataLoader(ds, sampler=RandomSampler(ds, replacement=True)),
                           tmp_path / "s", progress=False)
    assert again.rows == store.rows == N


def test_queries_from_random_samplers_are_read_as_drawn(tmp_path: Path) -> None:
    attr = cnn_attribution()
    attr.featurize(DataLoader(TensorDataset(images(N)), batch_size=BATCH), tmp_path / "s",
                   shard_rows=SHARD, progress=False)
    attr.fit()
    test = images(9, seed=4)
    for sampler in (RandomSampler(range(9), num_samples=5),
                    RandomSampler(range(9), replacement=True, num_samples=6)):
        top = attr.score(DataLoader(TensorDataset(test), batch_size=2, sampler=sampler), topk=3)
        assert top.query_ids is not None and len(top.query_ids) == sampler.num_samples
        direct = attr.score(test[top.query_ids], topk=3, ids=top.query_ids)
        torch.testing.assert_close(top.ids, direct.ids, rtol=0, atol=0)


def test_a_collate_function_that_drops_rows_may_name_the_rows_it_keeps(tmp_path: Path
                                                                       ) -> None:
    bad = {2, 9}

    class Indexed(TensorDataset):
        def __getitem__(self, i: int) -> tuple:
            return (*super().__getitem__(i), i)

    def skip_bad(items: list) -> dict:
        kept = [(x, i) for x, i in items if i not in bad]
        return {"x": torch.stack([x for x, _ in kept]), "ids": [i for _, i in kept]}

    loader = DataLoader(Indexed(images(N)), batch_size=4, collate_fn=skip_bad)
    store = cnn_attribution().featurize(loader, tmp_path / "s", progress=False)
    assert store.ids().tolist() == [i for i in range(N) if i not in bad]


def test_batches_come_back_in_sampler_order_whatever_the_loader_says() -> None:
    import time

    class SlowFirst(TensorDataset):
        def __getitem__(self, i: int) -> tuple:
            if i < 4:
                time.sleep(0.5)  # the first batch finishes last
            return super().__getitem__(i)

    x = images(16)
    kwargs = {"in_order": False} if "in_order" in DataLoader.__init__.__code__.co_varnames \
        else {}
    loader = DataLoader(SlowFirst(x), batch_size=4, num_workers=2, **kwargs)
    for xb, ids, _ in loading.Examples(loader):
        torch.testing.assert_close(xb, x[ids], rtol=0, atol=0)


def test_resume_with_too_few_examples_is_refused(tmp_path: Path) -> None:
    attr = cnn_attribution()
    path = tmp_path / "s"
    x = images(N)
    with pytest.raises(RuntimeError, match="disk on fire"):
        attr.featurize(DataLoader(Counted(x, fail_at=19), batch_size=BATCH), path,
                       shard_rows=SHARD, progress=False)
    for short in (DataLoader(TensorDataset(x[:10]), batch_size=BATCH), [],
                  batches(x[:12], BATCH)):
        with pytest.raises(StoreError, match="data end after .* already holds 16"):
            attr.featurize(short, path, shard_rows=SHARD, progress=False)
        assert not GradientStore.open(path, require_complete=False).complete


def test_a_loader_subclass_with_its_own_ids_does_not_warn() -> None:
    class Mine(DataLoader):
        pass

    data = [{"x": xi, "id": 1000 + i} for i, xi in enumerate(images(8))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = list(loading.Examples(Mine(data, batch_size=4, shuffle=True)))
    assert sorted(torch.cat([ids for _, ids, _ in got]).tolist()) == list(range(1000, 1008))


def test_a_distributed_sampler_is_refused_by_featurize_in_one_process(tmp_path: Path) -> None:
    """The training loader of a DDP job holds this rank's share of the data set: a store of it
    silently missed the other ranks' examples."""
    from torch.utils.data import DistributedSampler

    ds = TensorDataset(images(N))
    loader = DataLoader(ds, batch_size=BATCH, sampler=DistributedSampler(ds, num_replicas=2,
                                                                         rank=0))
    attr = cnn_attribution()
    with pytest.raises(ValueError, match=r"DistributedSampler.*rank 0 of 2.*Rebuild the loader"
                                         r".*distributed=True"):
        attr.featurize(loader, tmp_path / "store", progress=False)
    assert not (tmp_path / "store").exists()  # refused before the store was made
    # over one replica (torchrun --nproc_per_node=1) it holds every example: read in index order
    whole = DataLoader(ds, batch_size=BATCH, sampler=DistributedSampler(ds, num_replicas=1,
                                                                        rank=0))
    store = attr.featurize(whole, tmp_path / "whole", progress=False)
    assert store.ids().tolist() == list(range(N))


@pytest.mark.parametrize(("key", "ids", "shown"), [
    ("id", ["img0.png", "img1.png"], "img0.png"),
    ("ids", torch.tensor([0.5, 1.5]), "0.5"),
])
def test_ids_that_are_not_integers_are_a_type_error_naming_the_entry(
        key: str, ids: object, shown: str) -> None:
    data = [{"x": images(2), key: ids}]
    with pytest.raises(TypeError, match=rf"'{key}' must hold integer example ids, got .*{shown}"):
        list(loading.iterate_batches(data))


def test_a_label_first_tuple_is_refused_naming_what_was_taken_as_x(tmp_path: Path) -> None:
    class LabelFirst(TensorDataset):
        def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
            return torch.tensor(i % 3), super().__getitem__(i)[0]

    loader = DataLoader(LabelFirst(images(N)), batch_size=BATCH)
    with pytest.raises(ValueError, match=r"first element as x, here torch.int64 of shape \(4,\)"
                                         r".*element 1 is torch.float32 of shape \(4, 3, 12, 12\)"
                                         r".*'x'"):
        cnn_attribution().featurize(loader, tmp_path / "store", progress=False)
    # (x, label) and integer token batches [B, T] are read as they are
    x, _ = next(loading.iterate_batches([(images(2), torch.tensor([1, 2]))]))
    assert x.shape == (2, 3, 12, 12)
    tokens = torch.arange(6).reshape(2, 3)
    x, _ = next(loading.iterate_batches([(tokens, torch.ones(2, 4, 4))]))
    assert x is tokens
    # one categorical id per example (an embedding encoder) with a float [B, D] target
    items = torch.tensor([3, 7])
    x, _ = next(loading.iterate_batches([(items, torch.rand(2, 5))]))
    assert x is items


def test_an_empty_batch_with_ids_is_read_as_empty() -> None:
    # (a filtering collate may leave a batch empty: [] is float32 to torch, yet no id is wrong)
    for empty in ([], torch.tensor([])):
        x, ids = next(loading.iterate_batches([{"x": torch.zeros(0, 3), "ids": empty}]))
        assert ids is not None and ids.dtype == torch.int64 and ids.shape == (0,)


class _Stream(torch.utils.data.IterableDataset):
    """The examples of images(N) in order; ``shard``: each worker yields its share only."""

    def __init__(self, shard: bool) -> None:
        self.x, self.shard = images(N), shard

    def __iter__(self):  # type: ignore[no-untyped-def]
        info = torch.utils.data.get_worker_info()
        step, first = (1, 0) if info is None or not self.shard else (info.num_workers, info.id)
        return ((self.x[i],) for i in range(first, N, step))


def test_an_iterable_dataset_read_whole_by_every_worker_is_refused(tmp_path: Path) -> None:
    """Its examples are numbered by stream position: each worker's copy of the data would be
    stored again under other ids."""
    attr = cnn_attribution()
    copies = DataLoader(_Stream(shard=False), batch_size=BATCH, num_workers=2)
    with pytest.raises(ValueError, match="same first batches in two of its 2 workers.*Shard"):
        attr.featurize(copies, tmp_path / "copies", progress=False)
    sharded = DataLoader(_Stream(shard=True), batch_size=BATCH, num_workers=2)
    store = attr.featurize(sharded, tmp_path / "sharded", progress=False)
    assert store.rows == N  # each example once


def test_worker_shards_that_start_alike_are_not_taken_for_copies() -> None:
    # shards beginning with the same values (silence) under other ids, or without ids but
    # going on differently, are a dataset sharded by worker
    quiet, x = torch.zeros(BATCH, 3), torch.rand(4, BATCH, 3)
    with_ids = [(quiet, torch.arange(4)), (quiet, torch.arange(4, 8))]
    assert not loading._worker_copies(with_ids, 2)
    assert loading._worker_copies([(quiet, torch.arange(4))] * 2, 2)  # the same ids: copies
    without = [(quiet, None), (quiet, None), (x[0], None), (x[1], None)]
    assert not loading._worker_copies(without, 2)
    assert loading._worker_copies([(quiet, None), (quiet, None), (x[0], None), (x[0], None)], 2)
    assert not loading._worker_copies([(quiet, None), (quiet, None)], 2)  # one batch each
