"""The demo end to end on a reduced setting: report files exist and are valid images, and the
planted duplicates are found; a store the demo left is replaced by the next run, anything else in
its place is refused and kept."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib.image as mpimg
import pytest
from issl_fast.demo import DemoConfig, DemoOutputError, run_demo
from issl_fast.demo.run import _prepare_output


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cfg = DemoConfig(out=str(out), epochs=6, n_train=300, n_exact=8, n_near=4, n_outliers=9,
                     views=4, n_queries=4, topk=4, n_boot=50, progress=False)
    return out, run_demo(cfg, log=lambda msg: None)


def test_report_files_exist_and_are_valid_images(summary) -> None:
    out, s = summary
    assert set(s["figures"]) == {"proponents", "opponents", "outliers_top", "duplicates",
                                 "self_influence_hist", "groups"}
    for name in s["figures"].values():
        img = mpimg.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert img.std() > 0.01  # not a blank canvas
    report = (out / "report.md").read_text()
    for name in s["figures"].values():
        assert f"]({name})" in report
    # The outlier grid (the influence-neighbourhood ranking) is named and headed for what it
    # shows, not as self-influence, which is another score.
    assert s["figures"]["outliers_top"] == "outliers_top.png"
    assert ("### Most outlying images by the influence-neighbourhood score\n\n"
            "![Most outlying images by the influence-neighbourhood score](outliers_top.png)"
            in report)
    assert "self_influence_top" not in report and "self influence top" not in report
    assert json.loads((out / "summary.json").read_text())["store"]["rows"] == 300 + 8 + 4 + 9


def test_planted_duplicates_are_found(summary) -> None:
    _, s = summary
    d = s["quality"]["duplicates_influence"]
    assert d["recall"] >= 0.8
    assert d["precision"] >= 0.5
    # One-pixel shifted copies are found through the shift-tolerant matching (dup_shifts=1).
    assert s["quality"]["duplicates_by_kind_influence"]["shift"] == 1.0
    o = s["quality"]["outliers_influence"]
    assert o["auroc"] >= 0.8


def _copy(summary, tmp_path: Path) -> Path:
    """A copy of the demo's output (its store included), for a test that changes it."""
    out, _ = summary
    shutil.copytree(out, tmp_path / "out")
    assert (tmp_path / "out" / "store" / "manifest.json").exists()
    return tmp_path / "out"


def test_a_store_the_demo_left_is_deleted_and_nothing_else(summary, tmp_path: Path) -> None:
    out = _copy(summary, tmp_path)
    before = {p.name for p in out.iterdir()}
    assert _prepare_output(out) == out / "store"
    assert not (out / "store").exists()
    assert {p.name for p in out.iterdir()} == before - {"store"}  # the report stays


@pytest.mark.parametrize("change", ["user_file", "other_encoder", "not_a_dir"])
def test_anything_else_in_the_stores_place_is_refused_before_any_work(
        summary, tmp_path: Path, change: str) -> None:
    out = _copy(summary, tmp_path)
    store = out / "store"
    if change == "user_file":  # the demo's store, and a file of someone's among its files
        (store / "notes.txt").write_text("my data")
        reason = "not gradient-store files: ['notes.txt']"
    elif change == "other_encoder":  # a store of another encoder (another layout)
        manifest = json.loads((store / "manifest.json").read_text())
        manifest["fingerprint"]["layout"]["layers"][0]["d_out"] += 1
        (store / "manifest.json").write_text(json.dumps(manifest))
        reason = "a gradient store of another encoder"
    else:
        shutil.rmtree(store)
        store.write_text("my data")
        reason = "it is not a directory"
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    logged: list[str] = []
    # (a small setting: without the check the demo would run, and the test should stay short)
    cfg = DemoConfig(out=str(out), epochs=1, n_train=100, n_exact=2, n_near=2, n_outliers=3,
                     views=2, n_queries=2, topk=2, n_boot=10, progress=False)
    with pytest.raises(DemoOutputError) as err:
        run_demo(cfg, log=logged.append)
    assert f"{store} holds something the demo did not write" in str(err.value)
    assert reason in str(err.value)
    assert logged == []  # refused before the data stage
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files


def test_a_store_another_process_is_writing_is_refused_and_kept(summary, tmp_path: Path) -> None:
    # (another demo still featurising into --out: its store holds the writer lock)
    import subprocess
    import sys

    out = _copy(summary, tmp_path)
    lock = out / "store" / ".writer.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
         "os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); "
         "time.sleep(60)", str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        files = {p: p.read_bytes() for p in (out / "store").iterdir()}
        with pytest.raises(DemoOutputError, match="being written by another process"):
            _prepare_output(out)
        assert {p: p.read_bytes() for p in (out / "store").iterdir()} == files
    finally:
        holder.kill()
        holder.wait()
    assert _prepare_output(out) == out / "store"  # the writer gone: deleted as before
    assert not (out / "store").exists()
