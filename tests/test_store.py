"""The gradient store: determinism, order/batch invariance, integrity checks, fingerprints."""

from __future__ import annotations

import json
import shutil

import issl_fast as issl
import numpy as np
import pytest
import torch
from engine_models import batches, cnn_attribution, images
from issl_fast.store import GradientStore, StoreError

N = 37  # not a multiple of the batch or shard sizes


def _phi_by_id(store: GradientStore) -> dict[int, np.ndarray]:
    phi = store.load(torch.float32).numpy()
    return {int(i): phi[r] for r, i in enumerate(store.ids())}


def test_same_inputs_give_bit_identical_store(tmp_path) -> None:
    x = images(N)
    a = cnn_attribution().featurize(batches(x, 8), tmp_path / "a", shard_rows=10, progress=False)
    b = cnn_attribution().featurize(batches(x, 8), tmp_path / "b", shard_rows=10, progress=False)
    assert a.rows == b.rows == N
    for name in ["phi_000000.npy", "phi_000003.npy", "ids_000002.npy", "stats_000001.npz"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (
        json.loads((tmp_path / "a/manifest.json").read_text())["shards"]
        == json.loads((tmp_path / "b/manifest.json").read_text())["shards"]
    )


def test_other_batch_size_and_order_give_same_rows_per_id(tmp_path) -> None:
    x = images(N)
    ref = cnn_attribution(store_dtype="float32").featurize(
        batches(x, 8), tmp_path / "r", progress=False
    )
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(0))
    shuffled = [{"x": x[perm[i : i + 5]], "ids": perm[i : i + 5]} for i in range(0, N, 5)]
    other = cnn_attribution(store_dtype="float32").featurize(
        shuffled, tmp_path / "o", progress=False
    )
    a, b = _phi_by_id(ref), _phi_by_id(other)
    assert sorted(a) == sorted(b) == list(range(N))
    for i in range(N):
        # other batch shapes change torch's GEMM blocking in the forward/backward: float32 rounding
        np.testing.assert_allclose(a[i], b[i], rtol=1e-3, atol=1e-4 * np.abs(a[i]).max())
    # EK-FAC statistics are sums over the same examples
    sa, sb = ref.stats(), other.stats()
    for key in sa:
        torch.testing.assert_close(
            sa[key], sb[key], rtol=1e-4, atol=1e-6 * sa[key].abs().max().item()
        )


def test_corrupted_shard_is_detected_on_open(tmp_path) -> None:
    attr = cnn_attribution()
    attr.featurize(batches(images(20), 8), tmp_path / "s", shard_rows=8, progress=False)
    GradientStore.open(tmp_path / "s")  # intact: opens
    shard = tmp_path / "s" / "phi_000001.npy"
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0x40
    shard.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="phi_000001.npy is corrupted"):
        GradientStore.open(tmp_path / "s")
    (tmp_path / "s" / "ids_000000.npy").unlink()
    with pytest.raises(StoreError, match="ids_000000.npy is missing"):
        GradientStore.open(tmp_path / "s", verify=True)


def test_different_fingerprint_is_refused_with_the_difference(tmp_path) -> None:
    x = images(12)
    cnn_attribution().featurize(batches(x, 6), tmp_path / "s", progress=False)
    other = issl.InfluenceSSL(
        cnn_attribution().encoder,
        issl.AugmentationStability(views=3, seed=5, augment=issl.SSLAugment.light(seed=5)),
        issl.Projection("kron", k=64, seed=3),
        "ekfac",
    )
    with pytest.raises(StoreError, match=r"loss\.views: store has 2, now 3"):
        other.featurize(batches(x, 6), tmp_path / "s", progress=False)
    changed = cnn_attribution()
    with torch.no_grad():
        next(changed.encoder.parameters())[0, 0, 0, 0] += 1e-3
    with pytest.raises(StoreError, match="model: store has"):
        changed.fit(tmp_path / "s")


def test_store_refuses_to_write_into_a_foreign_directory(tmp_path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty"):
        cnn_attribution().featurize(batches(images(4), 4), tmp_path / "d", progress=False)
    assert (tmp_path / "d" / "notes.txt").read_text() == "mine"


def test_bfloat16_and_float16_stores_round_trip(tmp_path) -> None:
    x = images(10)
    ref = (
        cnn_attribution(store_dtype="float32")
        .featurize(batches(x, 5), tmp_path / "f32", progress=False)
        .load()
    )
    for dtype, tol in (("float16", 2e-3), ("bfloat16", 1e-2)):
        attr = cnn_attribution(store_dtype=dtype)
        st = attr.featurize(batches(x, 5), tmp_path / dtype, shard_rows=4, progress=False)
        got = st.load()
        assert (got - ref).abs().max() <= tol * ref.abs().max()
        attr.fit(st)
        top = attr.score(x[:2], topk=3, ids=torch.arange(2))
        assert top.ids[:, 0].tolist() == [0, 1]  # an example's own features score highest
        # The branch a GPU takes when it holds the whole store (one scan of one tensor instead
        # of the shards; here the tensor is on the CPU): the same result.
        attr._held_rows = lambda store, span, dt=dtype: store.load_to(
            "cpu", getattr(torch, dt), rows=span)
        held = attr.score(x[:2], topk=3, ids=torch.arange(2), exclude_rows=torch.tensor([0, -1]))
        del attr._held_rows
        shards = attr.score(x[:2], topk=3, ids=torch.arange(2), exclude_rows=torch.tensor([0, -1]))
        assert held.rows.tolist() == shards.rows.tolist() and 0 not in held.rows[0].tolist()
        torch.testing.assert_close(held.values, shards.values, rtol=0, atol=0)


def test_append_validates_shapes(tmp_path) -> None:
    st = GradientStore.create_or_resume(tmp_path / "s", {"a": 1}, dim=4)
    with pytest.raises(ValueError, match=r"phi must be \[b, 4\]"):
        st.append(torch.zeros(2, 5), torch.arange(2))
    with pytest.raises(ValueError, match=r"ids must be \[2\]"):
        st.append(torch.zeros(2, 4), torch.arange(3))
    with pytest.raises(ValueError, match="store dtype"):
        GradientStore.create_or_resume(tmp_path / "t", {}, dim=4, dtype="int8")


def test_content_key_and_load_to(tmp_path) -> None:
    # Two handles on one complete store share a key; a store rebuilt at the same path does not.
    phi = torch.randn(10, 4)
    a = GradientStore.create_or_resume(tmp_path / "s", {"m": 1}, 4, "bfloat16", 4)
    a.append(phi, torch.arange(10))
    a.finalize()
    b = GradientStore.open(tmp_path / "s", fingerprint={"m": 1})
    assert a.content_key == b.content_key and len(a.content_key[1]) == 3
    torch.testing.assert_close(b.load_to("cpu", torch.float32), b.load(torch.float32))
    assert b.load_to("cpu", torch.bfloat16).dtype == torch.bfloat16
    shutil.rmtree(tmp_path / "s")
    c = GradientStore.create_or_resume(tmp_path / "s", {"m": 1}, 4, "bfloat16", 4)
    c.append(phi + 1, torch.arange(10))
    c.finalize()
    assert c.content_key[0] == a.content_key[0] and c.content_key != a.content_key


def test_iter_rows_fills_chunks_across_shards(tmp_path) -> None:
    store = GradientStore.create_or_resume(tmp_path / "s", {"x": 1}, 2, "float16", shard_rows=5)
    phi = torch.arange(46, dtype=torch.float32).reshape(23, 2)
    store.append(phi, torch.arange(23))
    store.finalize()
    for chunk, span in ((7, None), (5, None), (3, (4, 21)), (100, (2, 9)), (1, (22, 23))):
        got = list(store.iter_rows(chunk, torch.float32, rows=span, fill=True))
        a, e = span or (0, 23)
        sizes = [t.shape[0] for t, _ in got]
        tail = [(e - a) % chunk] if (e - a) % chunk else []
        assert sizes == [chunk] * ((e - a) // chunk) + tail
        assert [first for _, first in got] == list(range(a, e, chunk))
        torch.testing.assert_close(torch.cat([t for t, _ in got]), phi[a:e], rtol=0, atol=0)
    # without fill, chunks end where shards do (memory bounded by the shard)
    firsts = [first for _, first in store.iter_rows(7, torch.float32)]
    assert firsts == [0, 5, 10, 15, 20]
    with pytest.raises(ValueError, match="chunk must be an int >= 1"):
        next(store.iter_rows(0))


def test_a_second_writer_is_refused_until_the_first_lets_go(tmp_path) -> None:
    import os

    path = tmp_path / "s"
    first = GradientStore.create_or_resume(path, {"x": 1}, 2, "float32", shard_rows=2)
    first.append(torch.ones(3, 2), torch.arange(3))  # one durable shard, one row pending
    with pytest.raises(StoreError, match=rf"being written by another writer \(process "
                                         rf"{os.getpid()}\).*distributed=True"):
        GradientStore.create_or_resume(path, {"x": 1}, 2, "float32", shard_rows=2)
    assert GradientStore.open(path, require_complete=False).rows == 2  # readers are welcome
    first.close()  # the pending row is dropped; the store stays resumable
    second = GradientStore.create_or_resume(path, {"x": 1}, 2, "float32", shard_rows=2)
    assert second.rows == 2
    second.append(2 * torch.ones(2, 2), torch.arange(2, 4))
    second.finalize()  # releases the lock: the complete store opens for anyone
    done = GradientStore.create_or_resume(path, {"x": 1}, 2, "float32", shard_rows=2)
    assert done.complete and done.ids().tolist() == [0, 1, 2, 3]


def test_the_lock_of_a_killed_writer_is_gone(tmp_path) -> None:
    import subprocess
    import sys
    import time

    path = tmp_path / "s"
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time, torch\n"
        "from issl_fast.store import GradientStore\n"
        f"s = GradientStore.create_or_resume({str(path)!r}, {{'x': 1}}, 2, 'float32')\n"
        "time.sleep(60)\n")])
    try:
        deadline = time.monotonic() + 60
        while not _holds_lock(path, child.pid):  # (no blocking read: a hung child fails)
            assert child.poll() is None and time.monotonic() < deadline, "the child never locked"
            time.sleep(0.05)
        with pytest.raises(StoreError, match=rf"another writer \(process {child.pid}\)"):
            GradientStore.create_or_resume(path, {"x": 1}, 2, "float32")
    finally:
        child.kill()
        child.wait(timeout=30)
    deadline = time.monotonic() + 10
    while True:  # the OS drops a dead process's lock
        try:
            store = GradientStore.create_or_resume(path, {"x": 1}, 2, "float32")
            break
        except StoreError:
            assert time.monotonic() < deadline, "the killed writer's lock was not released"
            time.sleep(0.1)
    store.append(torch.ones(1, 2), torch.arange(1))
    store.finalize()
    assert store.rows == 1


def _holds_lock(path, pid: int) -> bool:
    from issl_fast.store import WRITER_LOCK

    try:
        return (path / WRITER_LOCK).read_text().strip() == str(pid)
    except FileNotFoundError:
        return False


def test_dropped_and_closed_handles(tmp_path) -> None:
    import gc

    path = tmp_path / "s"
    s = GradientStore.create_or_resume(path, {"x": 1}, 2, "float32", shard_rows=2)
    s.append(torch.ones(2, 2), torch.arange(2))
    del s
    gc.collect()  # a dropped handle lets go of the lock
    again = GradientStore.create_or_resume(path, {"x": 1}, 2, "float32", shard_rows=2)
    again.close()
    with pytest.raises(StoreError, match="was closed"):
        again.append(torch.ones(1, 2), torch.arange(2, 3))
    with pytest.raises(StoreError, match="was closed"):
        again.finalize()
    # joining parts into a directory a writer holds is refused too
    holder = GradientStore.create_or_resume(tmp_path / "top", {"x": 1}, 2, "float32")
    part = GradientStore.create_or_resume(tmp_path / "top" / "part-00000-of-00001", {"x": 1}, 2,
                                          "float32", shard_rows=2)
    part.append(torch.ones(1, 2), torch.arange(1))
    part.finalize()
    with pytest.raises(StoreError, match="being written"):
        GradientStore.from_parts(tmp_path / "top", [part])
    holder.close()


def test_dataloader_workers_do_not_keep_the_lock(tmp_path) -> None:
    """Forked workers inherit the lock's descriptor; they must not keep the lock alive after
    the writer lets go (a retry in the same process, as in a notebook, must work)."""
    from torch.utils.data import DataLoader, TensorDataset

    class Flaky(TensorDataset):
        fail = True

        def __getitem__(self, i: int):
            if Flaky.fail and i == 9:
                raise RuntimeError("bad image")
            return super().__getitem__(i)

    attr = cnn_attribution()
    loader = DataLoader(Flaky(images(16)), batch_size=4, num_workers=2,
                        persistent_workers=True)
    with pytest.raises(RuntimeError, match="bad image"):
        attr.featurize(loader, tmp_path / "s", shard_rows=4, progress=False)
    Flaky.fail = False
    store = attr.featurize(DataLoader(Flaky(images(16)), batch_size=4, num_workers=2),
                           tmp_path / "s", shard_rows=4, progress=False)
    assert store.complete and store.ids().tolist() == list(range(16))
    del loader  # (its persistent workers held a copy of the descriptor all along)
