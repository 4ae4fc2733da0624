"""Host-side logic of the CUDA backend, testable without a GPU (the build must contain the CUDA
kernels; skipped otherwise): launch plans, workspace sizes, argument validation (ValueError before
any CUDA work is queued), and, on a machine without a usable device, that a failing CUDA call
surfaces as a RuntimeError carrying the CUDA error string."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
from issl_fast import _backend, _cuda_ops, ops
from issl_fast._backend import _C

pytestmark = pytest.mark.skipif(
    not hasattr(_C, "sketch_dense_cuda"),
    reason="this build has no CUDA kernels (built with ISSL_FAST_CUDA=OFF or without nvcc)",
)

F32, F16, BF16 = 0, 1, 2
RADEMACHER, GAUSSIAN = 0, 1
AUTO, SIMT, TC = 0, 1, 2
H200_SMS = 132
ALIGNED = 1 << 20  # a 16-byte aligned fake address: the plans only look at its alignment


def no_device() -> bool:
    return _backend.build_info()["cuda_devices"] == 0


@pytest.fixture(autouse=True)
def _portable_kernels() -> Iterator[None]:
    """The plans below are the portable kernels' unless a test switches a variant on (whatever
    ISSL_FAST_CUDA_VARIANTS says)."""
    with _cuda_ops.variants(()):
        yield


# ---------------------------------------------------------------------------------------------
# plans
# ---------------------------------------------------------------------------------------------
def test_gemm_plan_of_the_issue_benchmark() -> None:
    # sketch_dense B=256, P=1024*1024, k=4096, bf16: 2 x 32 tiles of 128, split in four to put
    # two blocks on each of 132 SMs without a second wave.
    p = _C.sketch_gemm_cuda_plan(BF16, 256, 1 << 20, 4096, RADEMACHER, AUTO, H200_SMS)
    assert p == {"tensor_cores": True, "passes": 1, "tile_m": 128, "tile_n": 128, "tiles_m": 2,
                 "tiles_n": 32, "splits": 4}


def test_gemm_plan_kernel_choice() -> None:
    plan = _C.sketch_gemm_cuda_plan
    assert not plan(BF16, 256, 4096, 4096, GAUSSIAN, AUTO, 132)["tensor_cores"]
    assert not plan(BF16, 8, 4096, 4096, RADEMACHER, AUTO, 132)["tensor_cores"]  # few rows
    assert plan(BF16, 8, 4096, 4096, RADEMACHER, TC, 132)["tensor_cores"]  # forced
    assert not plan(BF16, 256, 4096, 4096, RADEMACHER, SIMT, 132)["tensor_cores"]
    assert not plan(F32, 32, 4096, 4096, RADEMACHER, AUTO, 132)["tensor_cores"]  # 3 passes
    p = plan(F32, 64, 4096, 4096, RADEMACHER, AUTO, 132)
    assert p["tensor_cores"] and p["passes"] == 3
    assert plan(F16, 16, 64, 64, RADEMACHER, AUTO, 132)["passes"] == 1


def test_gemm_plan_splits() -> None:
    plan = _C.sketch_gemm_cuda_plan
    # One tile, long rows: capped at 64 splits.
    assert plan(BF16, 8, 1 << 20, 64, RADEMACHER, SIMT, 132)["splits"] == 64
    # Short rows: no split (each split keeps >= 256 columns).
    assert plan(BF16, 8, 300, 64, RADEMACHER, SIMT, 132)["splits"] == 1
    # Enough tiles to fill the device: no split.
    assert plan(BF16, 4096, 1 << 20, 4096, RADEMACHER, AUTO, 132)["splits"] == 1
    # The SM count sets the target (4 SIMT blocks per SM here).
    assert plan(BF16, 8, 1 << 20, 64, RADEMACHER, SIMT, 1)["splits"] == 4


def test_gemm_plan_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="rademacher"):
        _C.sketch_gemm_cuda_plan(BF16, 64, 64, 64, GAUSSIAN, TC, 132)
    with pytest.raises(ValueError, match="algo"):
        _C.sketch_gemm_cuda_plan(BF16, 64, 64, 64, RADEMACHER, 7, 132)
    with pytest.raises(ValueError, match="num_sms"):
        _C.sketch_gemm_cuda_plan(BF16, 64, 64, 64, RADEMACHER, AUTO, 0)


def test_score_plan() -> None:
    plan = _C.score_topk_cuda_plan
    p = plan(64, ALIGNED, BF16, 4_000_000, 1024, 100, 132, AUTO)
    assert p == {"tensor_cores": True, "queries_per_block": 64, "query_blocks": 1,
                 "partitions": 264, "rows_per_tile": 128, "pre_partitions": 0, "pre_rows": 0,
                 "pace_window": 0}
    assert plan(1, ALIGNED, BF16, 4_000_000, 1024, 100, 132, AUTO)["queries_per_block"] == 16
    p = plan(1024, ALIGNED, BF16, 4_000_000, 1024, 100, 132, AUTO)
    assert p["query_blocks"] == 16 and p["partitions"] == 16
    # Not bf16, k % 8 != 0, or a misaligned store: the SIMT scorer.
    assert not plan(4, ALIGNED, F16, 1000, 64, 5, 132, AUTO)["tensor_cores"]
    assert not plan(4, ALIGNED, BF16, 1000, 60, 5, 132, AUTO)["tensor_cores"]
    assert not plan(4, ALIGNED + 2, BF16, 1000, 64, 5, 132, AUTO)["tensor_cores"]
    assert not plan(4, ALIGNED, BF16, 1000, 64, 5, 132, SIMT)["tensor_cores"]
    with pytest.raises(ValueError, match="tensor-core"):
        plan(4, ALIGNED, F32, 1000, 64, 5, 132, TC)
    # Few rows: few partitions; huge lists: one partition; 2^33 rows: partitions < 2^30 rows.
    assert plan(4, ALIGNED, BF16, 1000, 64, 5, 132, AUTO)["partitions"] == 2
    assert plan(1024, ALIGNED, BF16, 10**6, 64, 100_000, 132, AUTO)["partitions"] == 1
    assert plan(1024, ALIGNED, BF16, 2**33, 64, 100_000, 132, AUTO)["partitions"] == 8
    assert plan(64, ALIGNED, BF16, 4_000_000, 1024, 100, 132, AUTO)["pre_partitions"] == 0


def test_score_plan_prepass() -> None:
    plan = _C.score_topk_cuda_plan
    with _cuda_ops.variants(["score_prepass"]):
        # m <= 64: one pre-partition per SM, 2 tiles each (>= 32768 rows); the 264 partitions of
        # the rest as without the pre-pass.
        p = plan(64, ALIGNED, BF16, 4_000_000, 1024, 100, H200_SMS, AUTO)
        assert (p["partitions"], p["pre_partitions"], p["pre_rows"]) == (264, 132, 2 * 132 * 128)
        # 16 query blocks: 8 pre-partitions per query block (one per SM in all), 32 tiles each.
        p = plan(1024, ALIGNED, BF16, 4_000_000, 1024, 100, H200_SMS, AUTO)
        assert (p["partitions"], p["pre_partitions"], p["pre_rows"]) == (16, 8, 32 * 8 * 128)
        # The SIMT family too (float32 store).
        assert plan(5, ALIGNED, F32, 1_000_000, 64, 10, H200_SMS, AUTO)["pre_partitions"] == 132
        # No pre-pass for a store under 8 samples, or topk over a quarter of the sample.
        assert plan(64, ALIGNED, BF16, 270_335, 1024, 100, H200_SMS, AUTO)["pre_partitions"] == 0
        assert plan(64, ALIGNED, BF16, 270_336, 1024, 100, H200_SMS, AUTO)["pre_partitions"] > 0
        assert plan(1, ALIGNED, BF16, 4_000_000, 64, 8449, H200_SMS, AUTO)["pre_partitions"] == 0
        assert plan(1, ALIGNED, BF16, 4_000_000, 64, 8448, H200_SMS, AUTO)["pre_partitions"] > 0


def test_score_plan_pace() -> None:
    plan = _C.score_topk_cuda_plan
    assert plan(1024, ALIGNED, BF16, 4_000_000, 1024, 100, H200_SMS, AUTO)["pace_window"] == 0
    with _cuda_ops.variants(["score_pace"]):
        # 16 query blocks x 16 partitions of 256 KB tiles: 16 MB / (16 x 256 KB) = 4 tiles.
        p = plan(1024, ALIGNED, BF16, 4_000_000, 1024, 100, H200_SMS, AUTO)
        assert (p["query_blocks"], p["partitions"], p["pace_window"]) == (16, 16, 4)
        # One query block: nothing to pace.
        assert plan(64, ALIGNED, BF16, 4_000_000, 1024, 100, H200_SMS, AUTO)["pace_window"] == 0
        # SIMT (float32 store, 16 queries per block): 64 blocks x 4 partitions of 512 KB tiles.
        p = plan(1024, ALIGNED, F32, 4_000_000, 1024, 100, H200_SMS, AUTO)
        assert (p["query_blocks"], p["partitions"], p["pace_window"]) == (64, 4, 8)
        # Wide rows: at least one tile; narrow ones: at most 8.
        assert plan(128, ALIGNED, BF16, 10**7, 2**16, 10, H200_SMS, AUTO)["pace_window"] == 1
        assert plan(128, ALIGNED, BF16, 10**7, 16, 10, H200_SMS, AUTO)["pace_window"] == 8


def test_kron_plan() -> None:
    plan = _C.sketch_kron_cuda_plan
    # The variant off: the two projections and the outer product.
    assert not plan(BF16, 64, 256, 64, 64, RADEMACHER, AUTO, H200_SMS)["fused"]
    with _cuda_ops.variants(["kron_fused"]):
        # The issue's benchmark: 64 examples x 4 row chunks of 64 -> 256 blocks, two per SM.
        assert plan(BF16, 64, 256, 64, 64, RADEMACHER, AUTO, H200_SMS) == {
            "fused": True, "in_blocks": 1, "out_blocks": 1, "splits": 4, "row_chunks": 4}
        assert plan(BF16, 300, 256, 64, 64, RADEMACHER, AUTO, H200_SMS)["splits"] == 1
        assert plan(BF16, 2, 10_000, 64, 64, RADEMACHER, AUTO, H200_SMS)["splits"] == 64  # cap
        assert plan(F16, 150, 200, 16, 16, RADEMACHER, AUTO, H200_SMS)["splits"] == 2
        # Sketch-row blocks of 64 along each factor, at most 4 in all (U, V recomputed per block).
        p = plan(BF16, 3, 17, 65, 65, RADEMACHER, TC, H200_SMS)
        assert p["fused"] and (p["in_blocks"], p["out_blocks"]) == (2, 2)
        assert plan(BF16, 3, 17, 129, 64, RADEMACHER, AUTO, H200_SMS)["fused"]
        assert not plan(BF16, 3, 17, 1000, 3, RADEMACHER, AUTO, H200_SMS)["fused"]
        assert not plan(BF16, 3, 17, 129, 65, RADEMACHER, AUTO, H200_SMS)["fused"]
        # 16-bit Rademacher only, never under a forced SIMT run.
        assert not plan(F32, 64, 256, 64, 64, RADEMACHER, AUTO, H200_SMS)["fused"]
        assert not plan(BF16, 64, 256, 64, 64, GAUSSIAN, AUTO, H200_SMS)["fused"]
        assert not plan(BF16, 64, 256, 64, 64, RADEMACHER, SIMT, H200_SMS)["fused"]


# ---------------------------------------------------------------------------------------------
# kernel variants: names, the default set, switching, the environment variable
# ---------------------------------------------------------------------------------------------
DEFAULT = ("kron_fused", "linear_wgmma", "score_tma", "score_wgmma")
ALL = ("kron_fused", "linear_wgmma", "linear_ws", "linear_ws_pair", "linear_ws_regs", "score_pace",
       "score_prepass", "score_stack", "score_tma", "score_wgmma")
EXPERIMENTAL = ("linear_ws", "linear_ws_pair", "linear_ws_regs", "score_pace", "score_prepass",
                "score_stack")


def test_variant_sets() -> None:
    assert _cuda_ops.variant_names() == ALL
    assert _cuda_ops.default_variants() == DEFAULT
    assert _cuda_ops.experimental_variants() == EXPERIMENTAL


def test_variants_switch_and_restore() -> None:
    assert _cuda_ops.enabled_variants() == ()  # the fixture
    with _cuda_ops.variants(["kron_fused"]):
        assert _cuda_ops.enabled_variants() == ("kron_fused",)
        assert _C.cuda_variants() == _C.CUDA_VARIANTS["kron_fused"]
        with _cuda_ops.variants(ALL):
            assert _cuda_ops.enabled_variants() == ALL
        assert _cuda_ops.enabled_variants() == ("kron_fused",)
    assert _cuda_ops.enabled_variants() == ()
    with pytest.raises(KeyError), _cuda_ops.variants(ALL):
        raise KeyError("restored on the way out")
    assert _C.cuda_variants() == 0


def test_builds_listing_sm90_carry_the_sm90a_wgmma_kernels() -> None:
    info = _backend.build_info()
    archs = info["cuda_architectures"].split(",")
    major = int(str(info["cuda_version"]).split(".")[0])
    lists_90 = any(a.split("-")[0].startswith("90") or a.split("-")[0] in ("native", "all")
                   for a in archs)
    assert _C.CUDA_SM90A == (lists_90 and major >= 12), (archs, info["cuda_version"])


def test_variant_errors_change_nothing() -> None:
    with _cuda_ops.variants(["score_wgmma"]):
        with pytest.raises(ValueError, match="unknown CUDA kernel variant 'fast'"):
            _cuda_ops.set_variants(["kron_fused", "fast"])
        with pytest.raises(ValueError, match="unknown kernel variant bits 1024"):
            _C.set_cuda_variants(1024 | 1)
        assert _cuda_ops.enabled_variants() == ("score_wgmma",)
    with pytest.raises(ValueError, match="not a single kernel variant bit: 3"):
        _C.cuda_variant_launches(3)
    with pytest.raises(ValueError, match="'nope'"):
        _cuda_ops.variant_launches("nope")
    assert _cuda_ops.variant_launches("kron_fused") >= 0


@pytest.mark.parametrize("value,expected", [
    ("", DEFAULT), (" ALL ", ALL), ("none", ()), ("default", DEFAULT),
    (" kron_fused , ", ("kron_fused",)),  # a bare name first: that variant alone
    ("none,+score_tma", ("score_tma",)), ("-score_wgmma,-linear_wgmma,-score_tma", ("kron_fused",)),
    ("none,score_wgmma,+kron_fused", ("kron_fused", "score_wgmma")),
    ("all,-score_tma", ("kron_fused", "linear_wgmma", "linear_ws", "linear_ws_pair",
                        "linear_ws_regs", "score_pace", "score_prepass", "score_stack",
                        "score_wgmma")),
    ("+score_prepass", tuple(sorted((*DEFAULT, "score_prepass")))),
    ("+score_prepass,+linear_ws,+score_pace,+linear_ws_pair,+score_stack,+linear_ws_regs", ALL),
    ("-kron_fused,+KRON_FUSED", DEFAULT),
])
def test_parse_variants_env(value: str, expected: tuple[str, ...]) -> None:
    assert _cuda_ops.parse_variants_env(value) == expected


@pytest.mark.parametrize("value", ["kron_fused,nope", "+nope", "-", "none,+"])
def test_parse_variants_env_rejects_unknown_names(value: str) -> None:
    with pytest.raises(ValueError, match="unknown CUDA kernel variant"):
        _cuda_ops.parse_variants_env(value)


@pytest.mark.parametrize("value,expected", [(None, ",".join(DEFAULT)),
                                            ("kron_fused", "kron_fused"),
                                            ("all", ",".join(ALL)),
                                            ("nope", "environment variable")])
def test_variants_environment_variable_at_import(value: str | None, expected: str) -> None:
    code = ("import torch, issl_fast\nfrom issl_fast import _cuda_ops\n"
            "print(','.join(_cuda_ops.enabled_variants()))")
    env = {k: v for k, v in os.environ.items() if k != "ISSL_FAST_CUDA_VARIANTS"}
    if value is not None:
        env["ISSL_FAST_CUDA_VARIANTS"] = value
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    if value == "nope":
        assert r.returncode != 0 and "ISSL_FAST_CUDA_VARIANTS" in r.stderr, r.stderr
        assert "'nope'" in r.stderr
    else:
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == expected


# ---------------------------------------------------------------------------------------------
# workspace sizes
# ---------------------------------------------------------------------------------------------
def test_workspace_sizes() -> None:
    # Split partials only: splits * B * k floats.
    assert _C.sketch_dense_cuda_workspace(BF16, 8, 1 << 20, 64, RADEMACHER, SIMT, 132) == (
        64 * 8 * 64 * 4)
    assert _C.sketch_dense_cuda_workspace(BF16, 4096, 1 << 20, 4096, RADEMACHER, AUTO, 132) == 0
    assert _C.sketch_dense_cuda_workspace(BF16, 0, 10, 64, RADEMACHER, AUTO, 132) == 0
    # Direct sketch_linear (bf16, T = 1): the same partials as the dense GEMM; T = 5 forms G in
    # chunks of at most 2^24 floats.
    direct = _C.sketch_linear_cuda_workspace(BF16, 256, 1, 1024, 1024, 4096, RADEMACHER, AUTO, 132)
    assert direct == 2 * 256 * 4096 * 4
    chunked = _C.sketch_linear_cuda_workspace(BF16, 256, 5, 1024, 1024, 4096, RADEMACHER, AUTO,
                                              132)
    assert (1 << 24) * 4 <= chunked <= (1 << 24) * 4 + 64 * 256 * 4096 * 4 + 1024
    assert _C.sketch_linear_cuda_workspace(BF16, 3, 0, 7, 5, 5, RADEMACHER, AUTO, 132) == 0
    assert _C.sketch_sparse_cuda_workspace(4, 0, 64, 2, 132) == 0
    assert _C.sketch_sparse_cuda_workspace(2, 40000, 64, 4, 132) == 64 * 2 * 64 * 4
    assert _C.sketch_kron_cuda_workspace(BF16, 64, 64, 512, 512, 64, 64, RADEMACHER, AUTO,
                                         132) >= 2 * 64 * 64 * 64 * 4
    with _cuda_ops.variants(["kron_fused"]):
        # Fused: only the split partials (splits * B * k_in * k_out floats), none with one split.
        assert _C.sketch_kron_cuda_workspace(BF16, 64, 256, 1024, 1024, 64, 64, RADEMACHER, AUTO,
                                             132) == 4 * 64 * 64 * 64 * 4
        assert _C.sketch_kron_cuda_workspace(BF16, 64, 64, 512, 512, 64, 64, RADEMACHER, AUTO,
                                             132) == 0
    # Direct sketch_linear, B=64, k=4096: 32 mma.sync tiles of 128 x 128 -> 4 splits; with the
    # wgmma kernel possible (chosen at launch), room for its 16 tiles of 256 x 64 -> 8 splits.
    args = (BF16, 64, 1, 1024, 1024, 4096, RADEMACHER, AUTO, 132)
    assert _C.sketch_linear_cuda_workspace(*args) == 4 * 64 * 4096 * 4
    with _cuda_ops.variants(["linear_wgmma"]):
        want = 8 if _C.CUDA_SM90A else 4
        assert _C.sketch_linear_cuda_workspace(*args) == want * 64 * 4096 * 4
    # linear_ws (single blocks or pairs): 32 tiles of 128 x 256 -> 4 splits; with an odd tile
    # count (k = 3968: 31 tiles) pairs round it up to 32.
    for names in (["linear_ws"], ["linear_ws_pair"], ["linear_ws_regs"]):
        with _cuda_ops.variants(names):
            for k in (4096, 3968):
                ws = _C.sketch_linear_cuda_workspace(BF16, 256, 1, 1024, 1024, k, RADEMACHER,
                                                     AUTO, 132)
                assert ws >= (4 * 256 * k * 4 if _C.CUDA_SM90A else 0), (names, k, ws)
    # score_topk: partitions' lists (+ the earlier result) + half of them again for the merge
    # tree + the bf16 split queries + one shared bar (int32) per query.
    m, topk, k = 64, 100, 1024
    ws = _C.score_topk_cuda_workspace(m, ALIGNED, BF16, 4_000_000, k, topk, False, 132, AUTO)
    lists = 264 * m * topk * 12
    fixed = lists + lists // 2 + 3 * m * k * 2 + 4 * m
    assert fixed <= ws <= fixed + 2048
    assert _C.score_topk_cuda_workspace(m, ALIGNED, BF16, 0, k, topk, False, 132, AUTO) == 0
    with _cuda_ops.variants(["score_prepass"]):  # + 132 pre-pass lists
        lists = (132 + 264) * m * topk * 12
        fixed = lists + lists // 2 + 3 * m * k * 2 + 4 * m
        ws = _C.score_topk_cuda_workspace(m, ALIGNED, BF16, 4_000_000, k, topk, False, 132, AUTO)
        assert fixed <= ws <= fixed + 2048
    m = 1024  # score_pace: + one int32 of progress per (partition, query block)
    lists = 16 * m * topk * 12
    fixed = lists + lists // 2 + 3 * m * k * 2 + 4 * m
    ws = _C.score_topk_cuda_workspace(m, ALIGNED, BF16, 4_000_000, k, topk, False, 132, AUTO)
    assert fixed <= ws <= fixed + 2048
    with _cuda_ops.variants(["score_pace"]):
        paced = _C.score_topk_cuda_workspace(m, ALIGNED, BF16, 4_000_000, k, topk, False, 132,
                                             AUTO)
        assert ws + 16 * 16 * 4 <= paced <= ws + 16 * 16 * 4 + 512


# ---------------------------------------------------------------------------------------------
# argument checks: ValueError before any CUDA call (fake addresses are never touched)
# ---------------------------------------------------------------------------------------------
def test_argument_errors_are_value_errors() -> None:
    with pytest.raises(ValueError, match="B must be >= 0"):
        _C.sketch_dense_cuda(0, BF16, -1, 5, 5, 0, 0, 0, 0, False, 0, 0, 132, AUTO, 0)
    with pytest.raises(ValueError, match="g is a null pointer"):
        _C.sketch_dense_cuda(0, BF16, 2, 5, 5, 0, 0, 0, 16, False, 0, 0, 132, AUTO, 0)
    with pytest.raises(ValueError, match="dtype"):
        _C.sketch_dense_cuda(16, 9, 2, 5, 5, 0, 0, 0, 16, False, 0, 0, 132, AUTO, 0)
    with pytest.raises(ValueError, match="s must satisfy"):
        _C.sketch_sparse_cuda(16, F32, 2, 5, 5, 6, 0, 0, 16, False, 0, 0, 132, 0)
    with pytest.raises(ValueError, match="k must be < 2\\^31"):
        _C.sketch_sparse_cuda_workspace(2, 5, 2**31, 2, 132)
    with pytest.raises(ValueError, match="d_in must be >= 1"):
        _C.sketch_linear_cuda(16, 16, BF16, 2, 1, 0, 5, 5, 0, 0, 0, 16, False, 0, 0, 132, AUTO, 0)
    with pytest.raises(ValueError, match="k_out must be >= 1"):
        _C.sketch_kron_cuda_workspace(BF16, 2, 1, 3, 3, 3, 0, RADEMACHER, AUTO, 132)
    with pytest.raises(ValueError, match="topk must be >= 1"):
        _C.score_topk_cuda(16, 1, 16, BF16, 5, 8, 0, 0, 0, 0, 16, 16, False, 0, 0, 132, AUTO, 0,
                           False)
    with pytest.raises(ValueError, match="rademacher"):
        _C.sketch_dense_cuda(16, BF16, 64, 64, 64, 0, GAUSSIAN, 0, 16, False, 0, 0, 132, TC, 0)


def test_too_small_workspace_is_a_value_error() -> None:
    # A plan with split-K partials needs a workspace: refused before the launch.
    need = _C.sketch_dense_cuda_workspace(BF16, 8, 1 << 20, 64, RADEMACHER, SIMT, 132)
    assert need > 0
    with pytest.raises(ValueError, match="workspace too small"):
        _C.sketch_dense_cuda(ALIGNED, BF16, 8, 1 << 20, 64, 0, 0, 0, ALIGNED, False, ALIGNED,
                             need - 1, 132, SIMT, 0)
    with pytest.raises(ValueError, match="workspace too small"):
        _C.score_topk_cuda(ALIGNED, 4, ALIGNED, BF16, 1000, 64, 5, 0, 0, 0, ALIGNED, ALIGNED,
                           False, 0, 0, 132, AUTO, 0, False)


@pytest.mark.skipif(not no_device(), reason="a CUDA device is present: fake addresses would be "
                    "dereferenced (the GPU run checks real launches instead)")
def test_cuda_failure_is_a_runtime_error_with_the_cuda_message() -> None:
    err = _backend.build_info()["cuda_error"]
    assert err, "no device, so the runtime reported why"
    cuda_msg = err.split(": ", 1)[1]
    # P = 0: the op zeroes out with a kernel launch, which fails without a device.
    with pytest.raises(RuntimeError, match="issl_fast CUDA") as ei:
        _C.sketch_dense_cuda(ALIGNED, BF16, 2, 0, 5, 0, 0, 0, ALIGNED, False, 0, 0, 132, AUTO, 0)
    assert cuda_msg in str(ei.value)
    # The float32 tensor-core kernel first raises its shared-memory limit (a CUDA call).
    need = _C.sketch_dense_cuda_workspace(F32, 256, 4096, 4096, RADEMACHER, TC, 132)
    with pytest.raises(RuntimeError, match="issl_fast CUDA"):
        _C.sketch_dense_cuda(ALIGNED, F32, 256, 4096, 4096, 0, 0, 0, ALIGNED, False, ALIGNED,
                             need, 132, TC, 0)


def test_ops_cuda_backend_on_cpu_tensors_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        ops.sketch_dense(torch.zeros(2, 3), 4, backend="cuda")
