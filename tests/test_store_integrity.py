"""A store is refused, as a StoreError naming it and what is wrong, when its manifest is damaged;
and it holds each example id once: repeated ids within a batch or across batches are refused,
leaving the store incomplete (resumable) with no row lost."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from engine_models import cnn_attribution, images
from issl_fast.store import MANIFEST, GradientStore, StoreError

FP = {"model": "integrity-test"}
DIM = 3


def _small_store(path: Path, stats: bool = False) -> dict:
    """A complete store of 5 rows in shards of 2 (with per-shard stats); its manifest."""
    store = GradientStore.create_or_resume(path, FP, DIM, "float32", shard_rows=2)
    extra = {"s": torch.ones(5, 2)} if stats else None
    store.append(torch.arange(15.0).reshape(5, DIM), torch.arange(5), extra)
    store.finalize()
    return json.loads((path / MANIFEST).read_text())


def _without(m: dict, key: str) -> dict:
    return {k: v for k, v in m.items() if k != key}


def _shard_without(m: dict, key: str) -> dict:
    return dict(m, shards=[_without(m["shards"][0], key)] + m["shards"][1:])


def _shard_with(m: dict, i: int, **fields: Any) -> dict:
    shards = [dict(sh, **fields) if j == i else sh for j, sh in enumerate(m["shards"])]
    return dict(m, shards=shards)


# name -> (the manifest's new text made from the good manifest, what the error must say)
DAMAGES: dict[str, tuple[Callable[[dict], str | bytes], str]] = {
    "truncated": (lambda m: json.dumps(m)[:50], "is not valid JSON"),
    "empty": (lambda m: "", "is not valid JSON"),
    "garbled bytes": (lambda m: b"\xff\xfe\x00{", "is not valid JSON"),
    "a list": (lambda m: "[]", "holds [], not a JSON object"),
    "null": (lambda m: "null", "holds null, not a JSON object"),
    "no format_version": (lambda m: json.dumps(_without(m, "format_version")),
                          "has format version None"),
    "no fingerprint": (lambda m: json.dumps(_without(m, "fingerprint")),
                       "it has no 'fingerprint'"),
    "no shards": (lambda m: json.dumps(_without(m, "shards")), "it has no 'shards'"),
    "no rows": (lambda m: json.dumps(_without(m, "rows")), "it has no 'rows'"),
    "no complete": (lambda m: json.dumps(_without(m, "complete")), "it has no 'complete'"),
    "no dim": (lambda m: json.dumps(_without(m, "dim")), "it has no 'dim'"),
    "fingerprint a list": (lambda m: json.dumps(dict(m, fingerprint=[])),
                           "its 'fingerprint' is [], not a JSON object"),
    "shards an object": (lambda m: json.dumps(dict(m, shards={})),
                         "its 'shards' is {}, not a JSON array"),
    "dim a string": (lambda m: json.dumps(dict(m, dim="3")),
                     "its 'dim' is \"3\", not a JSON integer"),
    "rows a boolean": (lambda m: json.dumps(dict(m, rows=True)),
                       "its 'rows' is true, not a JSON integer"),
    "complete a string": (lambda m: json.dumps(dict(m, complete="yes")),
                          "its 'complete' is \"yes\", not a JSON boolean"),
    "meta a list": (lambda m: json.dumps(dict(m, meta=[1])),
                    "its 'meta' is [1], not a JSON object"),
    "unknown dtype": (lambda m: json.dumps(dict(m, dtype="float8")),
                      "its dtype \"float8\" is not one of"),
    "zero shard_rows": (lambda m: json.dumps(dict(m, shard_rows=0)),
                        "its 'shard_rows' is 0, not >= 1"),
    "shard not an object": (lambda m: json.dumps(dict(m, shards=[7] + m["shards"][1:])),
                            "shard entry 0 is 7, not a JSON object"),
    "shard without sha256": (lambda m: json.dumps(_shard_without(m, "phi_sha256")),
                             "shard entry 0: it has no 'phi_sha256'"),
    "shard without ids": (lambda m: json.dumps(_shard_without(m, "ids")),
                          "shard entry 0: it has no 'ids'"),
    "shard without rows": (lambda m: json.dumps(_shard_without(m, "rows")),
                           "shard entry 0: it has no 'rows'"),
    "shard phi a number": (lambda m: json.dumps(_shard_with(m, 1, phi=1)),
                           "shard entry 1: its 'phi' is 1, not a JSON string"),
    "shard stats without sha256": (lambda m: json.dumps(_shard_with(m, 0, stats="x.npz")),
                                   "shard entry 0: it has no 'stats_sha256'"),
    "shard of no rows": (lambda m: json.dumps(_shard_with(m, 2, rows=0)),
                         "shard entry 2 holds 0 rows, not >= 1"),
    "shards overlap": (lambda m: json.dumps(_shard_with(m, 1, first_row=0)),
                       "shard entry 1 starts at row 0, not at 2 where the shards before it end"),
    "rows not the shards'": (lambda m: json.dumps(dict(m, rows=6)),
                             "its 'rows' is 6, but its shards hold 5"),
}


def _damage(path: Path, good: dict, name: str) -> str:
    text, says = DAMAGES[name]
    new = text(good)
    if isinstance(new, bytes):
        (path / MANIFEST).write_bytes(new)
    else:
        (path / MANIFEST).write_text(new)
    return says


@pytest.mark.parametrize("name", DAMAGES)
def test_a_damaged_manifest_is_a_store_error_saying_what_is_wrong(tmp_path: Path,
                                                                  name: str) -> None:
    path = tmp_path / "s"
    good = _small_store(path)
    assert GradientStore.open(path, FP).rows == 5  # (the undamaged store opens)
    says = _damage(path, good, name)
    for opening in (lambda: GradientStore.open(path, FP),
                    lambda: GradientStore.open(path, verify=False, require_complete=False),
                    lambda: GradientStore.create_or_resume(path, FP, DIM, "float32", 2)):
        with pytest.raises(StoreError, match=re.escape(says)) as err:
            opening()
        assert str(path) in str(err.value)
    # The refused resume let go of the writer's lock: the repaired store opens for writing.
    (path / MANIFEST).write_text(json.dumps(good))
    GradientStore.create_or_resume(path, FP, DIM, "float32", 2, reopen=True).close()


def test_a_damaged_manifest_with_stats_names_the_stats_field(tmp_path: Path) -> None:
    good = _small_store(tmp_path / "s", stats=True)
    assert "stats_sha256" in good["shards"][0]
    (tmp_path / "s" / MANIFEST).write_text(json.dumps(_shard_without(good, "stats_sha256")))
    with pytest.raises(StoreError, match="shard entry 0: it has no 'stats_sha256'"):
        GradientStore.open(tmp_path / "s")


def test_an_unreadable_manifest_is_a_store_error(tmp_path: Path) -> None:
    _small_store(tmp_path / "s")
    (tmp_path / "s" / MANIFEST).unlink()
    (tmp_path / "s" / MANIFEST).mkdir()  # exists, but cannot be read as a file
    with pytest.raises(StoreError, match=f"store at {re.escape(str(tmp_path / 's'))}: cannot "
                                         f"read {MANIFEST}"):
        GradientStore.open(tmp_path / "s")


def test_fit_and_featurize_on_a_damaged_manifest_raise_store_error(tmp_path: Path) -> None:
    attr = cnn_attribution()
    data = [(images(4),)]
    attr.featurize(data, tmp_path / "s", progress=False)
    for text in (json.dumps({"format_version": 1})[:10], "[]"):
        (tmp_path / "s" / MANIFEST).write_text(text)
        with pytest.raises(StoreError, match=re.escape(str(tmp_path / "s"))):
            attr.fit(tmp_path / "s")
        with pytest.raises(StoreError, match=re.escape(str(tmp_path / "s"))):
            attr.featurize(data, tmp_path / "s", progress=False)


# -- repeated example ids ----------------------------------------------------------------------
def test_append_refuses_ids_repeated_in_a_batch_before_queuing_any(tmp_path: Path) -> None:
    store = GradientStore.create_or_resume(tmp_path / "s", FP, DIM, "float32", shard_rows=4)
    store.append(torch.zeros(3, DIM), torch.tensor([0, 1, 2]))
    with pytest.raises(StoreError, match=re.escape("example ids [4, 7] occur more than once in "
                                                   "a batch")) as err:
        store.append(torch.ones(6, DIM), torch.tensor([7, 4, 4, 3, 7, 7]))
    assert "ids must name each example once" in str(err.value)
    assert str(tmp_path / "s") in str(err.value)
    # Nothing of the refused batch was queued or written; the handle still takes good rows.
    assert store.rows == 0 and store.num_shards == 0
    store.append(torch.ones(3, DIM), torch.tensor([3, 4, 5]))
    store.finalize()
    store = GradientStore.open(tmp_path / "s")
    assert store.complete and store.rows == 6
    np.testing.assert_array_equal(store.ids(), np.arange(6))
    torch.testing.assert_close(store.load(), torch.cat([torch.zeros(3, DIM),
                                                        torch.ones(3, DIM)]))


def test_finalize_refuses_ids_repeated_across_batches_and_stays_resumable(tmp_path: Path
                                                                         ) -> None:
    path = tmp_path / "s"
    store = GradientStore.create_or_resume(path, FP, DIM, "float32", shard_rows=2)
    store.append(torch.zeros(3, DIM), torch.tensor([0, 1, 2]))
    store.append(torch.ones(3, DIM), torch.tensor([3, 1, 0]))
    with pytest.raises(StoreError, match=re.escape("(id 0 in rows [0, 5]; id 1 in rows [1, 4])")
                       ) as err:
        store.finalize()
    assert "ids must name each example once" in str(err.value)
    assert "left incomplete" in str(err.value)
    # Incomplete, every row durable (the last partial shard was written first), lock released.
    with pytest.raises(StoreError, match="is incomplete"):
        GradientStore.open(path)
    again = GradientStore.create_or_resume(path, FP, DIM, "float32", shard_rows=2)
    assert not again.complete and again.rows == 6
    np.testing.assert_array_equal(again.ids(), [0, 1, 2, 3, 1, 0])
    again.close()


def test_featurize_refuses_ids_repeated_in_a_batch_then_resumes(tmp_path: Path) -> None:
    attr = cnn_attribution()
    x = images(8)
    bad = [{"x": x[:4], "ids": torch.arange(4)}, {"x": x[4:], "ids": torch.tensor([4, 5, 5, 6])}]
    good = [bad[0], {"x": x[4:], "ids": torch.tensor([4, 5, 6, 7])}]
    with pytest.raises(StoreError, match=re.escape("example ids [5] occur more than once")):
        attr.featurize(bad, tmp_path / "s", shard_rows=2, progress=False)
    left = GradientStore.open(tmp_path / "s", require_complete=False)
    assert not left.complete and left.rows == 4  # the first batch's shards stay
    # Featurize again with the ids mended: it resumes, to the store made in one go.
    store = attr.featurize(good, tmp_path / "s", shard_rows=2, progress=False)
    whole = attr.featurize(good, tmp_path / "whole", shard_rows=2, progress=False)
    assert store.complete and store.rows == 8
    np.testing.assert_array_equal(store.ids(), np.arange(8))
    assert torch.equal(store.load(), whole.load())


def test_featurize_refuses_ids_repeated_across_batches(tmp_path: Path) -> None:
    attr = cnn_attribution()
    x = images(8)
    data = [{"x": x[:4], "ids": torch.arange(4)},
            {"x": x[4:], "ids": torch.tensor([4, 5, 6, 3])}]
    for _ in range(2):  # and again: the resumed store is refused the same way
        with pytest.raises(StoreError, match=re.escape("id 3 in rows [3, 7]")):
            attr.featurize(data, tmp_path / "s", shard_rows=3, progress=False)
        left = GradientStore.open(tmp_path / "s", require_complete=False)
        assert not left.complete and left.rows == 8
    with pytest.raises(StoreError, match="is incomplete"):
        attr.fit(tmp_path / "s")


def _dict_batches(x: torch.Tensor, ids: list[int], size: int) -> list[dict]:
    return [{"x": x[a:a + size], "ids": torch.tensor(ids[a:a + size])}
            for a in range(0, len(ids), size)]


def test_append_to_a_store_refuses_an_id_it_holds(tmp_path: Path) -> None:
    attr = cnn_attribution()
    x = images(8)
    attr.featurize(_dict_batches(x[:4], [0, 1, 2, 3], 2), tmp_path / "s", shard_rows=2,
                   progress=False)
    before = GradientStore.open(tmp_path / "s")
    rows, ids, files = before.load(), before.ids(), sorted(p.name for p in tmp_path.glob("s/*"))
    with pytest.raises(StoreError, match=re.escape("id 2 in rows [2, 6]") + ".*dropped: the "
                       "store is as it was before"):
        attr.featurize(_dict_batches(x, [0, 1, 2, 3, 4, 5, 2, 6], 2), tmp_path / "s",
                       shard_rows=2, progress=False, append=True)
    # an append is refused whole: the complete store it grew from, file for file
    left = GradientStore.open(tmp_path / "s")
    assert left.complete and left.rows == 4
    assert torch.equal(left.load(), rows) and np.array_equal(left.ids(), ids)
    assert sorted(p.name for p in tmp_path.glob("s/*")) == files
    grown = attr.featurize(_dict_batches(x, [0, 1, 2, 3, 4, 5, 7, 6], 2), tmp_path / "s",
                           shard_rows=2, progress=False, append=True)
    assert grown.complete and grown.ids().tolist() == [0, 1, 2, 3, 4, 5, 7, 6]


def test_featurize_resume_and_append_with_own_ids_are_unaffected(tmp_path: Path) -> None:
    attr = cnn_attribution()
    x = images(10)
    ids = [9, 3, 7, 0, 4, 8, 1, 6, 2, 5]  # each once, in no order
    whole = attr.featurize(_dict_batches(x, ids, 2), tmp_path / "whole", shard_rows=3,
                           progress=False)
    np.testing.assert_array_equal(whole.ids(), ids)

    def crashing() -> Iterator[dict]:  # a run that dies after 3 batches (6 rows)
        for i, batch in enumerate(_dict_batches(x, ids, 2)):
            if i == 3:
                raise RuntimeError("crash")
            yield batch

    with pytest.raises(RuntimeError, match="crash"):
        attr.featurize(crashing(), tmp_path / "s", shard_rows=3, progress=False)
    assert GradientStore.open(tmp_path / "s", require_complete=False).rows == 6
    resumed = attr.featurize(_dict_batches(x, ids, 2), tmp_path / "s", shard_rows=3,
                             progress=False)
    assert resumed.complete
    np.testing.assert_array_equal(resumed.ids(), ids)
    assert torch.equal(resumed.load(), whole.load())

    grown = attr.featurize(_dict_batches(x[:6], ids[:6], 2), tmp_path / "g", shard_rows=3,
                           progress=False)
    grown = attr.featurize(_dict_batches(x, ids, 2), tmp_path / "g", shard_rows=3,
                           progress=False, append=True)
    assert grown.complete
    np.testing.assert_array_equal(grown.ids(), ids)
    assert torch.equal(grown.load(), whole.load())
