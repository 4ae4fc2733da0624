"""Per-call costs that must not grow with a store's shard count: the manifest is not rewritten
in full after every shard (O(n^2) writing), scans do not re-read every ids file or re-parse every
shard header, and a store passed by path is not re-opened (and re-hashed) on every call."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from engine_models import cnn_attribution, images
from issl_fast import store as store_module
from issl_fast.store import MANIFEST, MANIFEST_STRIDE, GradientStore, manifest_due

SHARDS, DIM = 300, 8


def _store(path: Path, shards: int = SHARDS, finalize: bool = True) -> GradientStore:
    s = GradientStore.create_or_resume(path, {"test": 1}, DIM, "float32", shard_rows=1)
    for i in range(shards):
        s.append(torch.full((1, DIM), float(i)), torch.tensor([i]))
    if finalize:
        s.finalize()
    return s


def _manifest_shards(path: Path) -> int:
    import json

    return len(json.loads((path / MANIFEST).read_text())["shards"])


def test_the_manifest_is_rewritten_o_n_times_and_lags_at_most_a_stride(tmp_path: Path,
                                                                       monkeypatch) -> None:
    writes = []
    real = GradientStore._write_manifest

    def counted(self: GradientStore) -> None:
        writes.append(len(self._m["shards"]))
        real(self)

    monkeypatch.setattr(GradientStore, "_write_manifest", counted)
    s = _store(tmp_path / "s", finalize=False)
    # after every shard while fewer than 2 * MANIFEST_STRIDE, then after each 1/64 of them
    assert writes[0] == 0  # (the new store's)
    assert writes[1:2 * MANIFEST_STRIDE] == list(range(1, 2 * MANIFEST_STRIDE))
    assert len(writes) < 200  # (per shard: 301)
    lag = SHARDS - _manifest_shards(tmp_path / "s")
    assert 0 <= lag <= SHARDS // MANIFEST_STRIDE
    # a writer killed now: the listed shards are the store, the rest is recomputed
    again = GradientStore.open(tmp_path / "s", require_complete=False, verify=True)
    assert again.rows == SHARDS - lag and again.ids().tolist() == list(range(SHARDS - lag))
    s.finalize()
    assert _manifest_shards(tmp_path / "s") == SHARDS


def test_manifest_writing_is_linear_in_the_shards() -> None:
    # entries encoded over a whole run, writing when manifest_due says: per shard it would be
    # n^2 / 2 (5e9 at 100k shards)
    for n in (1_000, 10_000, 100_000):
        listed = written = writes = 0
        for shards in range(1, n + 1):
            if manifest_due(shards, listed):
                listed, written, writes = shards, written + shards, writes + 1
        assert n - listed <= n // MANIFEST_STRIDE
        assert written < 2 * MANIFEST_STRIDE * n and writes < 2 * MANIFEST_STRIDE + 50 * np.log2(n)


def test_close_lists_the_shards_written_since_the_last_manifest(tmp_path: Path) -> None:
    s = _store(tmp_path / "s", finalize=False)
    s.close()  # (a featurize that fails: resumable with every durable shard)
    resumed = GradientStore.create_or_resume(tmp_path / "s", {"test": 1}, DIM, "float32", 1)
    assert resumed.rows == SHARDS and not resumed.complete
    resumed.finalize()


def test_scans_read_ids_and_shard_headers_once(tmp_path: Path, monkeypatch) -> None:
    _store(tmp_path / "s")
    s = GradientStore.open(tmp_path / "s", verify=False)  # (a fresh handle: nothing read yet)
    loads = []
    real = np.load

    def counted(path, *args, **kwargs):
        loads.append(Path(path).name.split("_")[0])
        return real(path, *args, **kwargs)

    monkeypatch.setattr(store_module.np, "load", counted)
    first = s.ids()
    for _ in range(4):
        ids = s.ids()
        ids[0] = -5  # (a copy: the store's stays)
    assert loads.count("ids") == SHARDS and s.ids()[0] == 0 and first[0] == 0
    for _ in range(3):
        rows = torch.cat([torch.from_numpy(np.array(a)) for a, _ in s.shards()])
    assert loads.count("phi") == SHARDS  # headers parsed on the first pass only
    assert torch.equal(rows[:, 0], torch.arange(SHARDS, dtype=torch.float32))


def test_a_store_path_is_opened_once_until_its_manifest_changes(tmp_path: Path,
                                                                monkeypatch) -> None:
    attr = cnn_attribution("block")
    x = images(8)
    attr.featurize([(x,)], tmp_path / "s", progress=False)
    opens = []
    real = GradientStore.open.__func__

    def counted(cls, path, *args, **kwargs):
        opens.append(path)
        return real(cls, path, *args, **kwargs)

    monkeypatch.setattr(GradientStore, "open", classmethod(counted))
    attr.fit(tmp_path / "s")
    first = attr.score(x[:2], topk=3, store=tmp_path / "s")
    again = attr.score(x[:2], topk=3, store=str(tmp_path / "s"))
    assert len(opens) == 1 and torch.equal(first.values, again.values)
    # the store made again at that path: opened again
    import shutil

    shutil.rmtree(tmp_path / "s")
    attr.featurize([(x[:6],)], tmp_path / "s", progress=False)
    assert attr.score(x[:2], topk=3, store=tmp_path / "s").n == 6
    assert len(opens) == 2


@pytest.mark.parametrize("solver", ["gauss_newton", "ekfac"])
def test_self_influence_over_many_chunks_fills_every_row(tmp_path: Path, monkeypatch,
                                                         solver: str) -> None:
    attr = cnn_attribution(solver)
    store = attr.featurize([(images(9),)], tmp_path / "s", shard_rows=2, progress=False)
    attr.fit(store)
    whole = attr.self_influence()
    phi = store.load(torch.float64)
    want = np.array([float(attr.solver.quad(phi[i:i + 1])[0]) for i in range(9)])
    np.testing.assert_allclose(whole, want, rtol=1e-10)


def test_a_relative_store_path_names_the_store_it_named_when_opened(tmp_path: Path,
                                                                     monkeypatch) -> None:
    attr = cnn_attribution("block")
    for name, n in (("a", 8), ("b", 5)):
        (tmp_path / name).mkdir()
        attr.featurize([(images(n),)], tmp_path / name / "s", progress=False)
    monkeypatch.chdir(tmp_path / "a")
    attr.fit("s")
    assert attr.score(images(2), topk=2, store="s").n == 8
    monkeypatch.chdir(tmp_path / "b")
    assert attr.score(images(2), topk=2, store=tmp_path / "a" / "s").n == 8
    assert attr.score(images(2), topk=2, store="s").n == 5


def test_a_bad_recheck_is_refused_before_a_store_is_made(tmp_path: Path) -> None:
    attr = cnn_attribution("block")
    with pytest.raises(ValueError, match="recheck"):
        attr.featurize([(images(4),)], tmp_path / "s", progress=False, recheck=-1)
    assert not (tmp_path / "s").exists()
    assert attr.featurize([(images(4),)], tmp_path / "s", progress=False).rows == 4
