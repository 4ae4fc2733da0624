"""Scale-out over torch.distributed ranks (gloo, CPU): real processes, compared with one process.

Every multi-rank test spawns W processes (torch.multiprocessing, a file:// rendezvous, one thread
each); each rank writes what it got to a file and the parent compares. Stores built by W ranks
hold the same rows in the same (stream) order as one process's store; the features differ only
by float rounding (the ranks featurise them in other batches).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import issl_fast as issl
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from engine_models import batches, cnn_attribution, images
from issl_fast import distributed, influence, loading
from issl_fast.store import GradientStore, StoreError, part_name
from torch.utils.data import DataLoader, TensorDataset, random_split

N, BATCH, SHARD, TOPK = 23, 4, 5, 4
# Sums over examples (K-FAC statistics, the curvature): float32 per-example terms computed in
# other batches (see below), added in float64 in another order.
RTOL = 1e-5
# Features of the same example computed in another batch (the ranks cut batches where their
# blocks end): torch's convolutions may sum in another order for another batch size (float32:
# ~1e-6 of a row's norm), and the float16 store then rounds some values the other way (2^-11
# of a value). Compared per row, relative to the row's norm.
PHI_ROW_RTOL = 1e-3
# Scores from those features (and the curvature fitted on them).
SCORE_RTOL = 1e-3


# -- running ranks --------------------------------------------------------------------------------
def _featurize_outcome(attr: issl.InfluenceSSL, data: Any, path: Path) -> str:
    """``"ok <rows>"``, or the error's type and message (asserted on by the tests)."""
    try:
        store = attr.featurize(data, path, shard_rows=SHARD, progress=False)
    except Exception as exc:  # noqa: BLE001 (asserted on by the test)
        return f"{type(exc).__name__} {exc}"
    return f"ok {store.rows}"


def _rank_main(rank: int, size: int, tmp: str, scenario: str, args: dict) -> None:
    torch.set_num_threads(1)
    # A short timeout: a rank left waiting in a collective fails the test instead of hanging it.
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank,
                            world_size=size, timeout=timedelta(seconds=60))
    distributed.PeerFailures.INTERVAL_S = 0.0  # look for failure notes before every batch
    try:
        outcome: dict[str, Any] = {"result": SCENARIOS[scenario](rank, size, Path(tmp), **args)}
    except Exception as exc:  # noqa: BLE001 (reported to the parent, which asserts on it)
        outcome = {"error": f"{type(exc).__name__}: {exc}", "type": type(exc).__name__}
    finally:
        dist.destroy_process_group()
    with open(Path(tmp) / f"rank{rank}.pkl", "wb") as f:
        pickle.dump(outcome, f)


def run_ranks(tmp_path: Path, size: int, scenario: str, **args: Any) -> list[dict]:
    """Runs ``SCENARIOS[scenario]`` on ``size`` ranks; each rank's outcome dict, in rank order."""
    run = tmp_path / f"run-{scenario}-{len(list(tmp_path.glob('run-*')))}"
    run.mkdir()
    mp.spawn(_rank_main, args=(size, str(run), scenario, args), nprocs=size, join=True)
    outcomes = []
    for r in range(size):
        with open(run / f"rank{r}.pkl", "rb") as f:
            outcomes.append(pickle.load(f))
    return outcomes


def _data(kind: str, n: int = N) -> Any:
    x = images(n)
    if kind == "list":
        return batches(x, BATCH)
    if kind == "loader":
        return DataLoader(TensorDataset(x), batch_size=BATCH)
    if kind == "dict":  # explicit, non-positional ids
        return [{"x": x[i:i + BATCH], "ids": torch.arange(i, min(i + BATCH, n)) * 7 + 3}
                for i in range(0, n, BATCH)]
    raise ValueError(kind)


def _queries() -> torch.Tensor:
    return images(5, seed=9)


def _everything(attr: issl.InfluenceSSL, store_path: Path, data_kind: str) -> dict:
    """featurize -> fit -> every scan, as plain arrays keyed by example id."""
    store = attr.featurize(_data(data_kind), store_path, shard_rows=SHARD, progress=False)
    attr.fit(store)
    ids = store.ids()
    top = attr.score(_queries(), topk=TOPK)
    low = attr.score(_queries(), topk=TOPK, opponents=True)
    # many queries: a list of batches (blocks of 2: under W ranks, featurised in turns), and
    # the store itself (each row excluding its own)
    featurised: list[int] = []
    features = attr.features
    attr.features = lambda x, ids=None: featurised.append(len(x)) or features(x, ids)
    block, influence.QUERY_BLOCK = influence.QUERY_BLOCK, 2
    try:
        many = attr.score(batches(_queries(), 2), topk=TOPK)
    finally:
        influence.QUERY_BLOCK = block
        attr.features = features
    itself = attr.score(store, topk=2, exclude_rows=torch.arange(store.rows))
    sim, nb = attr.neighbours(3)
    # and with transformed copies (each rank featurises its share of the shifted examples)
    t_sim, t_nb = attr.neighbours(2, data=_data(data_kind),
                                  transforms=issl.apps.translations(1)[:2])
    dups = attr.find_duplicates(threshold=-1.0, topk=2)
    # the approximate search probing every cluster is the exact one (each rank builds the index)
    c_sim, c_nb = attr.neighbours(3, search=issl.apps.ClusteredSearch(clusters=4, probes=4))
    return {
        "ids": ids,
        "phi": store.load(torch.float64).numpy(),
        "stats": {k: v.numpy() for k, v in store.stats().items()},
        "damping": attr.solver.damping_used,
        "top_values": top.values.numpy(), "top_ids": top.ids.numpy(),
        "low_values": low.values.numpy(), "low_ids": low.ids.numpy(),
        "many_values": many.values.numpy(), "many_ids": many.ids.numpy(),
        "many_query_ids": many.query_ids.numpy(), "many_featurised": sum(featurised),
        "itself_values": itself.values.numpy(), "itself_ids": itself.ids.numpy(),
        "self_influence": attr.self_influence(),
        "neighbour_sim": sim, "neighbour_ids": np.where(nb >= 0, ids[nb], -1),
        "t_neighbour_sim": t_sim, "t_neighbour_ids": np.where(t_nb >= 0, ids[t_nb], -1),
        "c_neighbour_sim": c_sim, "c_neighbour_ids": np.where(c_nb >= 0, ids[c_nb], -1),
        "dup_ids": dups.ids, "dup_sim": dups.similarity,
        # labels in dataset order: row i must be example i, as in one process
        "groups": attr.group_influence(np.arange(N) % 3, n_boot=10).self_mean,
        "parts": json.loads((store_path / "manifest.json").read_text()).get("parts"),
    }


def _scenario_everything(rank: int, size: int, tmp: Path, data_kind: str, solver: str,
                         device: str = "cpu") -> dict:
    attr = cnn_attribution(solver, distributed=True)
    if device == "cuda":
        _deterministic_cuda()
        attr.encoder.cuda()
    return _everything(attr, tmp / "store", data_kind)


def _deterministic_cuda() -> None:
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _single_process(tmp_path: Path, data_kind: str, solver: str, device: str = "cpu") -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: the same arithmetic, bit for bit
    try:
        attr = cnn_attribution(solver, distributed=False)
        if device == "cuda":
            _deterministic_cuda()
            attr.encoder.cuda()
        return _everything(attr, tmp_path / f"single-{data_kind}-{solver}-{device}", data_kind)
    finally:
        torch.set_num_threads(threads)


def _assert_rows_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    err = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
    assert err.max() <= PHI_ROW_RTOL, f"row {err.argmax()}: relative error {err.max():.2e}"


def _assert_same_attribution(got: dict, want: dict) -> None:
    np.testing.assert_array_equal(want["c_neighbour_ids"], want["neighbour_ids"])
    # The same rows in the same (stream) order; the ranks featurised them in other batches.
    np.testing.assert_array_equal(got["ids"], want["ids"])
    _assert_rows_close(got["phi"], want["phi"])
    assert got["stats"].keys() == want["stats"].keys()
    for k in want["stats"]:  # relative to the matrix's norm
        diff = np.linalg.norm(got["stats"][k] - want["stats"][k])
        assert diff <= RTOL * np.linalg.norm(want["stats"][k]), k
    assert got["damping"].keys() == want["damping"].keys()
    for k in want["damping"]:
        assert got["damping"][k] == pytest.approx(want["damping"][k], rel=RTOL)
    np.testing.assert_array_equal(got["many_query_ids"], np.arange(5))
    for key in ("top", "low", "many", "itself"):
        np.testing.assert_array_equal(got[f"{key}_ids"], want[f"{key}_ids"])
        np.testing.assert_allclose(got[f"{key}_values"], want[f"{key}_values"], rtol=SCORE_RTOL)
    np.testing.assert_allclose(got["self_influence"], want["self_influence"], rtol=SCORE_RTOL)
    for key in ("neighbour", "t_neighbour", "c_neighbour"):
        np.testing.assert_array_equal(got[f"{key}_ids"], want[f"{key}_ids"])
        np.testing.assert_allclose(got[f"{key}_sim"], want[f"{key}_sim"], rtol=SCORE_RTOL,
                                   atol=SCORE_RTOL)
    np.testing.assert_array_equal(got["dup_ids"], want["dup_ids"])
    np.testing.assert_allclose(got["groups"], want["groups"], rtol=SCORE_RTOL)


# -- featurize / fit / scans on W ranks equal one process ----------------------------------------
@pytest.mark.parametrize(("size", "data_kind", "solver"), [
    (2, "loader", "ekfac"),
    (3, "list", "ekfac"),
    (2, "dict", "block"),
])
def test_ranks_give_the_one_process_answer(tmp_path: Path, size: int, data_kind: str,
                                           solver: str) -> None:
    outcomes = run_ranks(tmp_path, size, "everything", data_kind=data_kind, solver=solver)
    assert all("error" not in o for o in outcomes), [o.get("error") for o in outcomes]
    want = _single_process(tmp_path, data_kind, solver)
    for o in outcomes:
        _assert_same_attribution(o["result"], want)
    # every rank holds the same answer, and the store is made of one part per rank
    assert outcomes[0]["result"]["parts"] == [part_name(r, size) for r in range(size)]
    # the 5 many-queries in blocks of 2 (0-1, 2-3, 4) were featurised once, shared out in turns
    block_sizes = [2, 2, 1]
    assert [o["result"]["many_featurised"] for o in outcomes] == [
        sum(b for j, b in enumerate(block_sizes) if j % size == r) for r in range(size)]
    for o in outcomes[1:]:
        np.testing.assert_array_equal(o["result"]["top_values"],
                                      outcomes[0]["result"]["top_values"])
        np.testing.assert_array_equal(o["result"]["self_influence"],
                                      outcomes[0]["result"]["self_influence"])


@pytest.mark.cuda
def test_ranks_on_a_gpu_give_the_one_process_answer(tmp_path: Path) -> None:
    """Two ranks (gloo) with the encoder, the sketches and the scans on the GPU, the GPU store
    held per rank's range of rows."""
    outcomes = run_ranks(tmp_path, 2, "everything", data_kind="loader", solver="ekfac",
                         device="cuda")
    assert all("error" not in o for o in outcomes), [o.get("error") for o in outcomes]
    want = _single_process(tmp_path, "loader", "ekfac", device="cuda")
    for o in outcomes:  # (float32 sketches on the GPU: the same batches, maybe other kernels)
        _assert_same_attribution(o["result"], want)


def test_torchrun_example_matches_one_process(tmp_path: Path) -> None:
    """examples/torchrun_attribution.py launched by torchrun (env:// rendezvous, 2 ranks) and
    run alone write the same result."""
    script = Path(__file__).parents[1] / "examples" / "torchrun_attribution.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    runs = {
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                     "--nproc_per_node=2", str(script), str(tmp_path / "torchrun")],
        "alone": [sys.executable, str(script), str(tmp_path / "alone")],
    }
    results = {}
    for name, cmd in runs.items():
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = json.loads((tmp_path / name / "result.json").read_text())
    two, one = results["torchrun"], results["alone"]
    assert (two["ranks"], one["ranks"]) == (2, 1)
    assert two["duplicate_ids"] == one["duplicate_ids"] == [[3, 200], [10, 301], [42, 402]]
    assert two["top_ids"] == one["top_ids"]
    np.testing.assert_allclose(two["top_values"], one["top_values"], rtol=1e-5)
    assert two["most_outlying_ids"] == one["most_outlying_ids"]


def test_the_store_opens_in_one_process(tmp_path: Path) -> None:
    run_ranks(tmp_path, 2, "everything", data_kind="list", solver="ekfac")
    path = next(tmp_path.glob("run-*")) / "store"
    alone = cnn_attribution(distributed=False)
    store = GradientStore.open(path, fingerprint=alone.fingerprint())  # checksums verified
    assert store.rows == N and store.complete
    assert sorted(store.ids().tolist()) == list(range(N))
    again = alone.featurize(batches(images(N), BATCH), path, shard_rows=SHARD, progress=False)
    assert again.content_key == store.content_key  # complete: nothing recomputed


# -- failures: every rank raises, nothing is lost, the run resumes -------------------------------
class _Crash(RuntimeError):
    pass


def _failing(data: list, fail_after: int) -> Any:
    for j, item in enumerate(data):
        if j == fail_after:
            raise _Crash(f"disk on fire at batch {j}")
        yield item


def _slow(data: list) -> Any:
    for item in data:
        time.sleep(0.4)
        yield item


def _scenario_crash_then_resume(rank: int, size: int, tmp: Path) -> dict:
    attr = cnn_attribution(distributed=True)
    path = tmp / "store"
    data = batches(images(N), BATCH)
    first: dict[str, Any] = {}
    try:
        # rank 1 dies after reading 4 batches; rank 0, slow, must stop instead of finishing
        attr.featurize(_failing(data, 4) if rank == 1 else _slow(data), path, shard_rows=SHARD,
                       progress=False)
    except Exception as exc:  # noqa: BLE001
        first = {"type": type(exc).__name__, "message": str(exc)}
    written = GradientStore.open(path / part_name(rank, size), verify=False,
                                 require_complete=False).rows
    store = attr.featurize(data, path, shard_rows=SHARD, progress=False)
    return {"first": first, "written": written, "ids": store.ids(),
            "phi": store.load(torch.float64).numpy()}


def test_a_failing_rank_stops_every_rank_and_the_run_resumes(tmp_path: Path) -> None:
    outcomes = [o["result"] for o in run_ranks(tmp_path, 2, "crash_then_resume")]
    assert outcomes[1]["first"]["type"] == "_Crash"
    assert outcomes[0]["first"]["type"] in ("PeerStopped", "RuntimeError")  # stopped early
    assert "rank 1" in outcomes[0]["first"]["message"]
    assert "disk on fire" in outcomes[0]["first"]["message"]
    # Blocks of SHARD=5 rows in turn: rank 1 had rows 5-9 and 15 when batch 4 failed (one
    # block durable); rank 0 stopped at its next batch (PeerStopped), short of its 13 rows
    # (0-4, 10-14, 20-22).
    assert outcomes[1]["written"] == 5
    assert outcomes[0]["written"] < 13
    want = _single_process(tmp_path, "list", "ekfac")
    for o in outcomes:
        np.testing.assert_array_equal(o["ids"], want["ids"])
        _assert_rows_close(o["phi"], want["phi"])


def _scenario_featurize(rank: int, size: int, tmp: Path, path: str, order: str = "stream"
                        ) -> str:
    attr = cnn_attribution(distributed=True)  # (seeds torch's RNG with the model's seed)
    torch.manual_seed(rank)  # an unseeded random order differs on each rank
    dataset = TensorDataset(images(N))
    if order == "shuffle":  # read in index order whatever the ranks draw
        data: Any = DataLoader(dataset, batch_size=BATCH, shuffle=True)
    elif order == "permuted":  # a sampler of its own: read as it draws
        data = DataLoader(dataset, batch_size=BATCH, sampler=torch.randperm(N).tolist())
    elif order == "random_split":  # unseeded: other examples at the same indices on each rank
        data = DataLoader(random_split(dataset, [N - 3, 3])[0], batch_size=BATCH)
    else:
        data = batches(images(N), BATCH)
    return str(attr.featurize(data, path, shard_rows=SHARD, progress=False))


def test_resuming_with_another_number_of_ranks_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "store"
    path.mkdir()
    attr = cnn_attribution(distributed=False)
    part = GradientStore.create_or_resume(path / part_name(0, 2), attr.fingerprint(), attr.dim)
    part.append(torch.zeros(2, attr.dim), torch.arange(2))
    outcomes = run_ranks(tmp_path, 3, "featurize", path=str(path))
    for o in outcomes:
        assert o["type"] in ("StoreError", "RuntimeError")
        assert "another number of ranks" in o["error"]
    with pytest.raises(StoreError, match="unfinished featurize by 2 ranks"):
        GradientStore.open(path)
    with pytest.raises(StoreError, match="unfinished featurize by 2 ranks"):
        attr.featurize(batches(images(N), BATCH), path, progress=False)


def test_a_sampler_drawing_another_order_on_each_rank_is_refused(tmp_path: Path) -> None:
    outcomes = run_ranks(tmp_path, 2, "featurize", path=str(tmp_path / "store"),
                         order="permuted")
    for o in outcomes:
        assert o["type"] == "ValueError"
        assert "order of examples" in o["error"] and "same on every rank" in o["error"]


def test_a_shuffling_loader_is_read_in_index_order_on_every_rank(tmp_path: Path) -> None:
    """Unseeded shuffle=True draws another order on each rank; it is read in index order, so
    the ranks agree and the store is the one-process store of the unshuffled data."""
    path = tmp_path / "store"
    run_ranks(tmp_path, 2, "featurize", path=str(path), order="shuffle")
    store = GradientStore.open(path)
    want = _single_process(tmp_path, "list", "ekfac")
    np.testing.assert_array_equal(store.ids(), want["ids"])
    _assert_rows_close(store.load().numpy(), want["phi"])


def test_loaders_with_other_examples_at_the_same_indices_are_refused(tmp_path: Path) -> None:
    """An unseeded random_split draws another subset per process: the same index order, other
    examples. The values of a few examples are in the digest the ranks compare."""
    outcomes = run_ranks(tmp_path, 2, "featurize", path=str(tmp_path / "store"),
                         order="random_split")
    for o in outcomes:
        assert o["type"] == "ValueError"
        assert "order of examples or their values" in o["error"], o["error"]
    # refused before any example was featurised
    parts = [GradientStore.open(p, verify=False, require_complete=False)
             for p in (tmp_path / "store").glob("part-*")]
    assert [p.rows for p in parts] == [0] * len(parts)
    assert not (tmp_path / "store" / "manifest.json").exists()


def _scenario_complete_store_met_again(rank: int, size: int, tmp: Path) -> list[str]:
    attr = cnn_attribution(distributed=True)

    def loader(n: int = N, seed: int = 1) -> DataLoader:
        return DataLoader(TensorDataset(images(n, seed=seed)), batch_size=BATCH)

    outcomes = []
    for data in (loader(), loader(N + 4), loader(seed=7), loader(seed=7 if rank else 1),
                 loader()):
        outcomes.append(_featurize_outcome(attr, data, tmp / "store"))
    return outcomes


def test_a_complete_store_met_again_is_checked_against_the_data(tmp_path: Path) -> None:
    """As in one process: a grown data set, other examples at the same indices (on every rank,
    or on one), are refused on every rank instead of returning the old store."""
    outcomes = [o["result"] for o in run_ranks(tmp_path, 2, "complete_store_met_again")]
    for built, grown, other, _, again in outcomes:
        assert built == again == f"ok {N}"
        assert grown.startswith("StoreError") and f"the data have {N + 4}" in grown, grown
        assert other.startswith("StoreError") and "featurised again differs" in other, other
    one_rank = [o[3] for o in outcomes]  # rank 1 alone was given the other images
    assert one_rank[1].startswith("StoreError") and "featurised again differs" in one_rank[1]
    assert one_rank[0].startswith("RuntimeError") and "rank 1" in one_rank[0]


def _scenario_other_settings_on_a_rank(rank: int, size: int, tmp: Path) -> dict[str, str]:
    """Each call with a setting or argument that differs on rank 1, then (the ranks still in
    step) the same call with the same ones."""
    def attempt(call: Any) -> str:
        try:
            return f"ok {call()}"
        except Exception as exc:  # noqa: BLE001 (asserted on by the test)
            return f"{type(exc).__name__} {exc}"

    path = tmp / "store"
    data = batches(images(N), BATCH)
    out = {"dtype": attempt(lambda: cnn_attribution(
        "block", distributed=True, store_dtype="float32" if rank else "float16").featurize(
            data, path, shard_rows=SHARD, progress=False).rows)}
    out["parts after dtype"] = str(sorted(p.name for p in path.glob("part-*")))
    attr = cnn_attribution("block", distributed=True)
    out["fixed rerun"] = attempt(lambda: attr.featurize(data, path, shard_rows=SHARD,
                                                        progress=False).rows)
    store = attr.store
    for name, kw in [("solver", {"solver": "gauss_newton" if rank else "block"}),
                     ("damping", {"damping": 10.0 if rank else 0.1}),
                     ("absolute_damping", {"absolute_damping": 1.0 if rank else None})]:
        other = cnn_attribution(**{"solver": "block", **kw}, distributed=True)
        out[name] = attempt(lambda other=other: other.fit(store).solver.kind)
    out["fit"] = attempt(lambda: attr.fit(store).solver.kind)
    out["neighbours"] = attempt(lambda: attr.neighbours(3 + rank)[1].shape)
    out["find_outliers"] = attempt(lambda: len(attr.find_outliers(k=2 + rank).ids))
    out["find_duplicates"] = attempt(
        lambda: len(attr.find_duplicates(threshold=0.8 + 0.1 * rank, topk=2).ids))
    exclude = torch.full((2,), rank, dtype=torch.int64)
    out["score"] = attempt(lambda: attr.score(_queries()[:2], topk=3,
                                              exclude_rows=exclude).rows.shape)
    out["same arguments"] = attempt(lambda: attr.neighbours(3)[1].shape)
    return out


def test_other_settings_or_arguments_on_a_rank_are_refused_before_any_work(tmp_path: Path
                                                                         ) -> None:
    """Another store_dtype, solver, damping, topk, k, threshold or exclude_rows on one rank is a
    ValueError on every rank, before the step's collectives (gloo aborted every process on
    other shapes; other values silently mixed the ranks' answers)."""
    outcomes = [o["result"] for o in run_ranks(tmp_path, 2, "other_settings_on_a_rank")]
    assert outcomes[0] == outcomes[1]  # every rank raises the same error
    got = outcomes[0]
    # refused before any part was made, so the fixed rerun builds the store
    assert got["dtype"].startswith("ValueError") and "store_dtype" in got["dtype"]
    assert got["parts after dtype"] == "[]"
    assert got["fixed rerun"] == f"ok {N}"
    for name in ("solver", "damping", "absolute_damping"):
        assert got[name].startswith("ValueError"), got[name]
        assert "solver, damping, absolute_damping or store" in got[name]
    assert got["fit"] == "ok block"
    for name, what in [("neighbours", "topk"), ("find_outliers", "k"),
                       ("find_duplicates", "threshold"), ("score", "exclude_rows")]:
        assert got[name].startswith("ValueError") and "differs between rank 0" in got[name], \
            got[name]
        assert what in got[name]
    assert got["same arguments"] == f"ok {(N, 3)}"


def _scenario_other_data_on_a_rank(rank: int, size: int, tmp: Path) -> list[str]:
    attr = cnn_attribution(distributed=True)
    x = images(N)
    wrong = x + 1.0 if rank == 1 else x  # rank 1 was given other images of the same sizes
    outcomes = []
    for data in (batches(wrong, BATCH), batches(wrong, BATCH), batches(x, BATCH), None):
        if data is None:  # what the third run's error says to do: start again
            dist.barrier()
            if rank == 0:
                shutil.rmtree(tmp / "store")
            dist.barrier()
            data = batches(x, BATCH)
        outcomes.append(_featurize_outcome(attr, data, tmp / "store"))
    return outcomes


def test_other_data_on_a_rank_is_refused_again_on_rerun_then_resumes(tmp_path: Path) -> None:
    outcomes = [o["result"] for o in run_ranks(tmp_path, 2, "other_data_on_a_rank")]
    for first, rerun, _, _ in outcomes:
        # refused before any part is finished, so an identical rerun cannot join them
        assert first.startswith("ValueError") and "data stream" in first
        assert rerun.startswith("ValueError") and "data stream" in rerun
    # with the right data, rank 1's part (features of the wrong images, ids as they should be)
    # is found out by featurising some of its examples again, instead of being joined
    refused, stopped = outcomes[1][2], outcomes[0][2]
    assert refused.startswith("StoreError") and "featurised again differs" in refused
    # (rank 0 stops at its next batch, or at the barrier after its part: either names rank 1)
    assert "rank 1" in stopped and "StoreError: the data do not give the examples" in stopped
    assert [o[3] for o in outcomes] == [f"ok {N}"] * 2


def _scenario_collate_drops_rows(rank: int, size: int, tmp: Path) -> str:
    def drop_first(items: list) -> list[torch.Tensor]:
        return [torch.stack([t for (t,) in items[1:]])]  # "a corrupt example" dropped

    loader = DataLoader(TensorDataset(images(N)), batch_size=BATCH, collate_fn=drop_first)
    attr = cnn_attribution(distributed=True)
    return str(attr.featurize(loader, tmp / "store", shard_rows=SHARD, progress=False))


def test_a_loader_that_drops_rows_is_refused(tmp_path: Path) -> None:
    for o in run_ranks(tmp_path, 2, "collate_drops_rows"):
        assert o["type"] in ("ValueError", "RuntimeError")
        assert "rows for" in o["error"] and "wrapped" in o["error"]


def _scenario_missing_shard(rank: int, size: int, tmp: Path, method: str) -> str:
    attr = cnn_attribution("block", distributed=True)
    store = attr.featurize(batches(images(N), BATCH), tmp / "store", shard_rows=SHARD,
                           progress=False)
    attr.fit(store)
    dist.barrier()
    if rank == 0:  # the last shard, in rank 1's range of rows
        last = json.loads((tmp / "store" / "manifest.json").read_text())["shards"][-1]["phi"]
        (tmp / "store" / last).rename(tmp / "moved.npy")
    dist.barrier()
    if method == "score":
        return str(attr.score(_queries(), topk=3).values.shape)
    return str(attr.self_influence().shape)


@pytest.mark.parametrize("method", ["score", "self_influence"])
def test_a_scan_failing_on_one_rank_raises_on_every_rank(tmp_path: Path, method: str) -> None:
    start = time.monotonic()
    outcomes = run_ranks(tmp_path, 2, "missing_shard", method=method)
    assert time.monotonic() - start < 50  # not left waiting for the 60 s timeout
    assert outcomes[1]["type"] == "FileNotFoundError"
    assert outcomes[0]["type"] == "RuntimeError" and "rank 1" in outcomes[0]["error"]


def _scenario_rank_zero_alone(rank: int, size: int, tmp: Path) -> int:
    # attribution on rank 0 only, as at the end of a DDP job: the default works alone
    rows = -1
    if rank == 0:
        attr = cnn_attribution()
        store = attr.featurize(batches(images(N), BATCH), tmp / "store", progress=False)
        attr.fit(store)
        rows = int(attr.score(_queries(), topk=2).n)
    dist.barrier()
    return rows


def test_the_default_works_alone_beside_a_process_group(tmp_path: Path) -> None:
    outcomes = run_ranks(tmp_path, 2, "rank_zero_alone")
    assert [o["result"] for o in outcomes] == [N, -1]


def _scenario_different_queries(rank: int, size: int, tmp: Path) -> str:
    attr = cnn_attribution("identity", distributed=True)
    attr.featurize(batches(images(N), BATCH), tmp / "store", shard_rows=SHARD, progress=False)
    q = torch.randn(2 + rank, attr.dim)  # rank 1 has one query more
    return str(attr.topk_from_preconditioned(q, 3))


def test_different_queries_per_rank_are_refused_on_every_rank(tmp_path: Path) -> None:
    for o in run_ranks(tmp_path, 2, "different_queries"):
        assert o["type"] == "ValueError" and "queries' shape" in o["error"]


SCENARIOS = {
    "everything": _scenario_everything,
    "crash_then_resume": _scenario_crash_then_resume,
    "featurize": _scenario_featurize,
    "different_queries": _scenario_different_queries,
    "rank_zero_alone": _scenario_rank_zero_alone,
    "other_data_on_a_rank": _scenario_other_data_on_a_rank,
    "collate_drops_rows": _scenario_collate_drops_rows,
    "missing_shard": _scenario_missing_shard,
    "complete_store_met_again": _scenario_complete_store_met_again,
    "other_settings_on_a_rank": _scenario_other_settings_on_a_rank,
}


# -- the pieces, in one process --------------------------------------------------------------------
def test_distributed_true_needs_a_process_group() -> None:
    with pytest.raises(ValueError, match="init_process_group"):
        cnn_attribution(distributed=True)


@pytest.mark.parametrize(("n", "size"), [(0, 3), (1, 2), (10, 3), (23, 4), (5, 8)])
def test_row_ranges_split_every_row_once(n: int, size: int) -> None:
    spans = [distributed.row_range(n, r, size) for r in range(size)]
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert max(s[1] - s[0] for s in spans) - min(s[1] - s[0] for s in spans) <= 1


def test_merge_topk_equals_one_pass_over_all_rows() -> None:
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(6, 16, generator=gen)
    g = torch.randn(37, 16, generator=gen)
    g[20] = g[3]  # an exact tie: the lower row must win
    want_v, want_i = issl.ops.score_topk(q, g, 9, backend="cpu")
    pieces = [(0, 5), (5, 5), (5, 30), (30, 37)]  # one piece empty, one shorter than topk
    parts = [issl.ops.score_topk(q, g[a:b], 9, index_offset=a, backend="cpu")
             for a, b in pieces]
    v, i = distributed.merge_topk([p[0] for p in parts], [p[1] for p in parts], 9)
    torch.testing.assert_close(v, want_v, rtol=0, atol=0)
    torch.testing.assert_close(i, want_i, rtol=0, atol=0)
    # more slots than rows: the empty ones stay (-inf, -1), last
    v, i = distributed.merge_topk([parts[0][0][:, :2]], [parts[0][1][:, :2]], 3)
    assert v.shape == (6, 2)


@pytest.mark.parametrize("size", [1, 2, 3, 5])
@pytest.mark.parametrize(("kind", "shard_rows"), [("list", 3), ("list", 64), ("loader", 3),
                                                  ("loader", 64)])
def test_rank_examples_cover_the_stream_once_in_blocks(size: int, kind: str,
                                                      shard_rows: int) -> None:
    x = images(N)
    got: dict[int, torch.Tensor] = {}
    for rank in range(size):
        rb = loading.Examples(_data(kind), rank, size, shard_rows)
        # a loader's length is known: blocks small enough for ~8 per rank; else shard_rows
        assert rb.block == (max(1, min(shard_rows, -(-N // (8 * size)))) if kind == "loader"
                            else shard_rows)
        mine = 0
        for xb, ids, position in rb:
            # positions, or a loader's dataset indices (the same for a sequential loader)
            assert ids.tolist() == list(range(position, position + xb.shape[0]))
            assert 0 < xb.shape[0] <= BATCH
            for j in range(xb.shape[0]):
                assert (position + j) // rb.block % size == rank  # only this rank's blocks
                assert position + j not in got
                got[position + j] = xb[j]
            mine += xb.shape[0]
        assert rb.rows == (mine if kind == "loader" else None)
        assert rb.digest is not None  # known after a whole pass, for both kinds
    assert sorted(got) == list(range(N))
    torch.testing.assert_close(torch.stack([got[p] for p in range(N)]), x, rtol=0, atol=0)


def test_rank_examples_loader_reads_only_its_examples() -> None:
    read: list[int] = []

    class Logged(TensorDataset):
        def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
            read.append(int(i))
            return super().__getitem__(i)

    loader = DataLoader(Logged(images(100)), batch_size=BATCH, num_workers=0)
    rb = loading.Examples(loader, 1, 3, shard_rows=64)
    assert rb.block == 5  # 100 rows, 3 ranks: ~8 blocks each
    # the examples whose values the ranks compare (evenly spread, the same on every rank)
    assert read[:loading.DIGEST_EXAMPLES] == [0, 33, 66, 99]
    del read[:loading.DIGEST_EXAMPLES]
    list(rb)
    assert sorted(read) == [i for i in range(100) if (i // 5) % 3 == 1]
    # unbalanced (query blocks): blocks of shard_rows whatever the length
    assert loading.Examples(loader, 1, 3, shard_rows=64, balance=False).block == 64


def test_rank_examples_refuse_a_distributed_sampler_and_keep_loader_subclasses() -> None:
    from torch.utils.data import DistributedSampler

    ds = TensorDataset(images(N))
    with pytest.raises(ValueError, match="DistributedSampler"):
        loading.Examples(DataLoader(ds, batch_size=4, sampler=DistributedSampler(
            ds, num_replicas=2, rank=0)), 0, 2, SHARD)

    class Shifted(DataLoader):  # post-processes its batches: must be read as it is
        def __iter__(self):  # type: ignore[override]
            for (xb,) in super().__iter__():
                yield {"x": xb - 0.5}

    pieces = list(loading.Examples(Shifted(ds, batch_size=4), 0, 2, SHARD))
    assert pieces[0][0].min() < 0  # the subclass's own batches
    torch.testing.assert_close(pieces[0][0], images(N)[:4] - 0.5)

    class Keyed(TensorDataset):  # a sampler of (index, scale) keys: read as any iterable
        def __getitem__(self, key: tuple[int, float]) -> tuple[torch.Tensor, ...]:
            return (super().__getitem__(key[0])[0] * key[1],)

    keyed = DataLoader(Keyed(images(N)), batch_size=4, sampler=[(i, 2.0) for i in range(N)])
    rb = loading.Examples(keyed, 1, 2, SHARD)
    assert rb.rows is None  # not re-made: read whole, this rank's pieces kept
    got = torch.cat([xb for xb, _, _ in rb])
    x = images(N)
    torch.testing.assert_close(got, 2.0 * torch.cat([x[5:10], x[15:20]]), rtol=0, atol=0)


def test_from_parts_takes_shards_in_turn_and_refuses_bad_parts(tmp_path: Path) -> None:
    attr = cnn_attribution(distributed=False)
    fp = attr.fingerprint()

    def part(name: str, ids: list[int], fingerprint: dict = fp) -> GradientStore:
        s = GradientStore.create_or_resume(tmp_path / name, fingerprint, attr.dim,
                                           shard_rows=2)
        s.append(torch.tensor(ids, dtype=torch.float32)[:, None].expand(-1, attr.dim),
                 torch.tensor(ids))
        s.finalize()
        return s

    # three ranks taking turns on blocks of 2 over 9 rows: 0-1 2-3 4-5 | 6-7 8
    a, b, c = part("a", [0, 1, 6, 7]), part("b", [2, 3, 8]), part("c", [4, 5])
    store = GradientStore.from_parts(tmp_path, [a, b, c])
    assert store.ids().tolist() == list(range(9))
    assert store.load()[:, 0].tolist() == list(range(9))
    assert [first for _, first in store.shards()] == [0, 2, 4, 6, 8]
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(StoreError, match="taking turns"):
        GradientStore.from_parts(tmp_path, [c, b, a])  # c holds one shard, not two
    d = part("d", [6, 9])
    with pytest.raises(StoreError, match=r"example ids \[6\] occur in more than one part"):
        GradientStore.from_parts(tmp_path, [a, d])
    e = part("e", [20, 21, 22, 23])
    with pytest.raises(StoreError, match="holds 1 rows, not 2"):
        GradientStore.from_parts(tmp_path, [b, e])  # b's short last shard is not the last
    f = part("f", [10, 11], dict(fp, model="other weights"))
    with pytest.raises(StoreError, match="did every rank load the same weights"):
        GradientStore.from_parts(tmp_path, [a, f])
    assert not (tmp_path / "manifest.json").exists()
    with pytest.raises(ValueError, match="directly inside"):
        GradientStore.from_parts(tmp_path / "elsewhere", [a])


def test_store_row_ranges_read_only_that_range(tmp_path: Path) -> None:
    store = GradientStore.create_or_resume(tmp_path / "s", {"x": 1}, 3, "float32", shard_rows=4)
    phi = torch.arange(30, dtype=torch.float32).reshape(10, 3)
    store.append(phi, torch.arange(10))
    store.finalize()
    for span in [(0, 10), (3, 9), (4, 8), (5, 5), (9, 10)]:
        got = store.load_to("cpu", torch.float32, rows=span)
        torch.testing.assert_close(got, phi[span[0]:span[1]], rtol=0, atol=0)
        firsts = [first for _, first in store.iter_rows(chunk=3, rows=span)]
        assert firsts == sorted(firsts) and (not firsts or firsts[0] == span[0])
    with pytest.raises(ValueError, match="within"):
        store.load_to("cpu", torch.float32, rows=(2, 11))


def test_rank_examples_remake_a_loader_with_workers() -> None:
    """The re-made loader keeps the workers, prefetching and collate function."""
    loader = DataLoader(TensorDataset(images(N)), batch_size=BATCH, num_workers=2,
                        prefetch_factor=3, persistent_workers=True)
    rb = loading.Examples(loader, 1, 2, SHARD)
    remade = loading.loader_over(loader, [[0, 1]])
    assert (remade.num_workers, remade.prefetch_factor, remade.persistent_workers,
            remade.collate_fn) == (2, 3, True, loader.collate_fn)
    got = {pos: xb for xb, _, pos in rb}
    x = images(N)
    for pos, xb in got.items():
        assert (pos // rb.block) % 2 == 1
        torch.testing.assert_close(xb, x[pos:pos + xb.shape[0]], rtol=0, atol=0)
    assert sum(xb.shape[0] for xb in got.values()) == rb.rows


def test_rank_examples_refuse_ids_that_do_not_match_the_batch() -> None:
    data = [{"x": images(3), "ids": torch.arange(5)}]
    with pytest.raises(ValueError, match="a batch has 5 ids for 3 examples"):
        list(loading.Examples(data, 0, 2, SHARD))
