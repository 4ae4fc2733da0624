"""The demo end to end on a reduced setting: report files exist and are valid images, and the
planted duplicates are found."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import pytest
from issl_fast.demo import DemoConfig, run_demo


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cfg = DemoConfig(out=str(out), epochs=6, n_train=300, n_exact=8, n_near=4, n_outliers=9,
                     views=4, n_queries=4, topk=4, n_boot=50, progress=False)
    return out, run_demo(cfg, log=lambda msg: None)


def test_report_files_exist_and_are_valid_images(summary) -> None:
    out, s = summary
    assert set(s["figures"]) == {"proponents", "opponents", "self_influence_top", "duplicates",
                                 "self_influence_hist", "groups"}
    for name in s["figures"].values():
        img = mpimg.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert img.std() > 0.01  # not a blank canvas
    report = (out / "report.md").read_text()
    for name in s["figures"].values():
        assert f"]({name})" in report
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
