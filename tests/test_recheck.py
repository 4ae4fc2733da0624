"""A store met again (resumed, appended to, complete) featurises a few of its examples again and
compares them with their rows: renumbered or replaced data, which keep the stored ids, are a
StoreError instead of features filed under the wrong examples."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_models import batches, cnn_attribution, images
from issl_fast.recheck import RECHECK_TOLERANCE, Recheck, store_recheck
from issl_fast.store import MANIFEST, GradientStore, StoreError
from torch.utils.data import DataLoader, Dataset, TensorDataset

N, BATCH, SHARD = 12, 4, 4


class _Images(Dataset):
    """Images by index, recording the indices loaded; ``fail_at`` raises (a crash)."""

    def __init__(self, x: torch.Tensor, fail_at: int | None = None) -> None:
        self.x, self.fail_at, self.loaded = x, fail_at, []

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == self.fail_at:
            raise RuntimeError("disk on fire")
        self.loaded.append(int(i))
        return self.x[i]


class _Jittered(_Images):
    """A dataset with a random transform: every read of an example differs."""

    def __getitem__(self, i: int) -> torch.Tensor:
        return super().__getitem__(i) + 0.5 * torch.randn_like(self.x[i])


def _sorted_in(x: torch.Tensor, at: int, new: torch.Tensor) -> torch.Tensor:
    """``x`` with ``new`` examples inserted at ``at`` (new files sorted in among the old)."""
    return torch.cat([x[:at], new, x[at:]])


def test_sample_spreads_over_the_stored_rows_and_holds_the_last() -> None:
    check = Recheck(4, lambda x, ids, rows: None)
    for done in range(0, 40):
        rows = check.sample(done)
        assert len(rows) == min(4, done)
        assert np.array_equal(rows, np.unique(rows)) and (rows >= 0).all()
        if done:
            assert rows[0] == 0 and rows[-1] == done - 1
    assert len(Recheck(0, check.compare).sample(10)) == 0


@pytest.mark.parametrize("bad", [-1, 1.5, True, "4"])
def test_recheck_must_be_a_count(tmp_path: Path, bad: object) -> None:
    attr = cnn_attribution()
    with pytest.raises(ValueError, match=r"recheck \(stored examples .*\) must be an int >= 0"):
        attr.featurize(DataLoader(TensorDataset(images(N)), batch_size=BATCH), tmp_path / "s",
                       progress=False, recheck=bad)  # type: ignore[arg-type]


def test_the_same_examples_pass_well_within_the_tolerance(tmp_path: Path) -> None:
    """The margin the tolerance leaves: the same example featurised in another batch, and the
    nearest other example, measured with the comparison the check uses."""
    attr = cnn_attribution()
    x = images(N)
    store = attr.featurize(DataLoader(TensorDataset(x), batch_size=BATCH), tmp_path / "s",
                           shard_rows=SHARD, progress=False)
    errors: list[float] = []

    def featurize(xs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        phi = attr.features(xs, ids)
        stored = store.load()[ids]
        scale = torch.maximum(phi.norm(dim=1), stored.norm(dim=1))
        errors.extend(((phi - stored).norm(dim=1) / scale).tolist())
        return phi

    check = store_recheck(store, featurize, 5)
    assert check is not None
    rows = check.sample(N)
    check.compare(x[rows], torch.from_numpy(rows), rows)  # one batch of 5, not the stored ones
    assert len(errors) == 5 and max(errors) < RECHECK_TOLERANCE / 20
    # another example in the place of each: far outside it
    shifted = np.roll(rows, 1)
    with pytest.raises(StoreError, match="featurised again differs"):
        check.compare(x[shifted], torch.from_numpy(rows), rows)
    assert min(errors[5:]) > 2 * RECHECK_TOLERANCE


def test_append_to_renumbered_data_is_refused_and_leaves_the_store(tmp_path: Path) -> None:
    attr = cnn_attribution()
    old = images(N)
    attr.featurize(DataLoader(TensorDataset(old), batch_size=BATCH), tmp_path / "s",
                   shard_rows=SHARD, progress=False)
    manifest = (tmp_path / "s" / MANIFEST).read_bytes()
    grown = _sorted_in(old, 8, images(3, seed=9))  # ids 8.. now name other images
    with pytest.raises(StoreError, match=r"example id 11 \(row 11\) featurised again differs"):
        attr.featurize(DataLoader(TensorDataset(grown), batch_size=BATCH), tmp_path / "s",
                       shard_rows=SHARD, progress=False, append=True)
    assert (tmp_path / "s" / MANIFEST).read_bytes() == manifest
    assert GradientStore.open(tmp_path / "s").complete
    # grown at the end instead: appended
    at_end = torch.cat([old, images(3, seed=9)])
    store = attr.featurize(DataLoader(TensorDataset(at_end), batch_size=BATCH), tmp_path / "s",
                           shard_rows=SHARD, progress=False, append=True)
    assert store.rows == N + 3 and store.complete


def test_a_complete_store_met_with_changed_data_of_the_same_length(tmp_path: Path) -> None:
    attr = cnn_attribution()
    x = images(N)
    store = attr.featurize(DataLoader(TensorDataset(x), batch_size=BATCH), tmp_path / "s",
                           shard_rows=SHARD, progress=False)
    same = _Images(x)
    again = attr.featurize(DataLoader(same, batch_size=BATCH), tmp_path / "s", progress=False)
    assert again.rows == N and torch.equal(again.load(), store.load())
    assert same.loaded == [0, 4, 7, 11]  # the sample only, not the whole data
    changed = x.clone()
    changed[4] = images(1, seed=9)[0]
    with pytest.raises(StoreError, match=r"example id 4 \(row 4\)"):
        attr.featurize(DataLoader(TensorDataset(changed), batch_size=BATCH), tmp_path / "s",
                       progress=False)
    # recheck=0: returned as it is
    unchecked = _Images(changed)
    assert attr.featurize(DataLoader(unchecked, batch_size=BATCH), tmp_path / "s",
                          progress=False, recheck=0).rows == N
    assert unchecked.loaded == []


def test_resume_with_replaced_examples_is_refused_then_resumes_with_the_data(
        tmp_path: Path) -> None:
    attr = cnn_attribution()
    x = images(N)
    with pytest.raises(RuntimeError, match="disk on fire"):
        attr.featurize(DataLoader(_Images(x, fail_at=9), batch_size=BATCH), tmp_path / "s",
                       shard_rows=SHARD, progress=False)
    assert GradientStore.open(tmp_path / "s", require_complete=False).rows == 8
    replaced = x.clone()
    replaced[7] = replaced[7].flip(-1).roll(3, -2)  # the last stored example
    with pytest.raises(StoreError, match=r"example id 7 \(row 7\).*recheck=0"):
        attr.featurize(DataLoader(TensorDataset(replaced), batch_size=BATCH), tmp_path / "s",
                       shard_rows=SHARD, progress=False)
    store = attr.featurize(DataLoader(TensorDataset(x), batch_size=BATCH), tmp_path / "s",
                           shard_rows=SHARD, progress=False)
    whole = attr.featurize(DataLoader(TensorDataset(x), batch_size=BATCH), tmp_path / "w",
                           shard_rows=SHARD, progress=False)
    assert store.complete and torch.equal(store.load(), whole.load())


def test_an_iterable_is_checked_from_the_examples_it_reads(tmp_path: Path) -> None:
    """Batches without a loader are read from the start on a resume: the sampled examples are
    kept as they go by and compared before anything new is written."""
    attr = cnn_attribution()
    x = images(N)

    def crashing() -> Iterator[tuple[torch.Tensor]]:
        yield from batches(x, BATCH)[:2]
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        attr.featurize(crashing(), tmp_path / "s", shard_rows=SHARD, progress=False)
    replaced = x.clone()
    replaced[2] = images(1, seed=9)[0]  # a sampled row (of 8: 0, 2, 5, 7)
    with pytest.raises(StoreError, match=r"example id 2 \(row 2\)"):
        attr.featurize(batches(replaced, 3), tmp_path / "s", shard_rows=SHARD, progress=False)
    assert GradientStore.open(tmp_path / "s", require_complete=False).rows == 8
    store = attr.featurize(batches(x, 3), tmp_path / "s", shard_rows=SHARD, progress=False)
    assert store.complete and store.rows == N


def test_a_dataset_with_random_transforms_is_named(tmp_path: Path) -> None:
    attr = cnn_attribution()
    x = images(N)
    torch.manual_seed(0)
    attr.featurize(DataLoader(_Jittered(x), batch_size=BATCH), tmp_path / "s",
                   shard_rows=SHARD, progress=False)
    with pytest.raises(StoreError, match="random transforms in the dataset"):
        attr.featurize(DataLoader(_Jittered(x), batch_size=BATCH), tmp_path / "s",
                       progress=False)
