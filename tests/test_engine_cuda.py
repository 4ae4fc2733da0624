"""The engine on a GPU: an ``InfluenceSSL`` whose encoder lives on CUDA featurises, scores and
finds duplicates there (CUDA sketches, the store streamed through the GPU by the top-k kernel)
and must give what the same engine gives on the CPU.

The two devices run the same float32 math in other orders (cuDNN convolutions, the CUDA
sketches' summation order), so features agree to float32 rounding amplified by the network, not
bit for bit: rows are compared by relative norm. Scores are checked for consistency rather than
rank equality (near-ties may swap): every returned row's score, recomputed on the CPU, equals the
value returned, and the values are the CPU's top values. Each scan test counts the CUDA top-k
calls, so a scan that silently ran on the CPU fails. TF32 is switched off for these tests (cuDNN
uses it for convolutions by default; it would cost ~3 decimal digits) and cuDNN is made
deterministic (two GPU runs of the same batch are compared at 1e-6).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator

import issl_fast as issl
import numpy as np
import pytest
import torch
from engine_models import (
    FoldedFrames,
    Signal1d,
    Video3d,
    batches,
    cnn_attribution,
    images,
    tiny_vit,
)
from issl_fast import apps, ops, residency
from issl_fast.augment import view_uniforms
from issl_fast.store import GradientStore

pytestmark = pytest.mark.cuda

# Per-row relative difference allowed between GPU and CPU features. The float32 pipeline's own
# error against float64 (same encoder and views, 256 rows, measured on the CPU) is at most
# 2.5e-5 per row (p99 1.3e-5); two float32 runs in other orders differ by about that: ~10x margin.
ROW_RTOL = 3e-4


@pytest.fixture(autouse=True)
def _exact_cudnn() -> Iterator[None]:
    backends = torch.backends
    saved = (backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32,
             backends.cudnn.deterministic)
    backends.cudnn.allow_tf32 = backends.cuda.matmul.allow_tf32 = False
    backends.cudnn.deterministic = True
    yield
    (backends.cudnn.allow_tf32, backends.cuda.matmul.allow_tf32,
     backends.cudnn.deterministic) = saved


@pytest.fixture()
def cuda_scans(monkeypatch) -> list[int]:
    """Counts the top-k calls that ran on the GPU (ops.score_topk with CUDA queries)."""
    calls: list[int] = []
    real = ops._score_topk_cuda

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "_score_topk_cuda", counted)
    return calls


def _pair(kind: str = "kron", solver: str = "ekfac", *, shared: bool = False,
          **kw) -> tuple[issl.InfluenceSSL, issl.InfluenceSSL]:
    """The same attribution on the CPU and (a deep copy of the encoder) on the GPU; ``shared``:
    every example gets the same views, so exact duplicates get identical features."""
    cpu = cnn_attribution(solver, kind, **kw)
    if shared:
        cpu.loss.augment = dataclasses.replace(cpu.loss.augment, shared=True)
    gpu = copy.deepcopy(cpu)
    gpu.encoder.cuda()
    return cpu, gpu


def _assert_rows_close(gpu: torch.Tensor, cpu: torch.Tensor, rtol: float = ROW_RTOL) -> None:
    assert gpu.shape == cpu.shape
    g, c = gpu.double().cpu(), cpu.double()
    err = (g - c).norm(dim=1) / c.norm(dim=1).clamp(min=1e-30)
    assert float(err.max()) < rtol, f"worst row {int(err.argmax())}: relative error {err.max()}"


@pytest.mark.parametrize("kind", ["kron", "dense", "identity"])
def test_features_on_the_gpu_match_the_cpu(kind) -> None:
    # small_cnn: two Conv2d (kron: conv2d without im2col), two Linear and a LayerNorm that falls
    # back to torch.func + sketch_dense: every path of the featuriser.
    cpu, gpu = _pair(kind, "block")
    assert cpu.device == torch.device("cpu") and gpu.device.type == "cuda"
    x, ids = images(13, seed=4), torch.arange(100, 113)
    phi_gpu = gpu.features(x, ids)  # x on the CPU: moved to the encoder's device
    assert phi_gpu.device == gpu.device
    _assert_rows_close(phi_gpu, cpu.features(x, ids))
    # A batch already on the GPU gives the same features as the same batch from the CPU.
    _assert_rows_close(gpu.features(x.cuda(), ids), phi_gpu, rtol=1e-6)


def test_featurize_on_the_gpu_builds_the_cpu_store(tmp_path) -> None:
    cpu, gpu = _pair(store_dtype="float32")
    x = images(37, seed=2)
    a = cpu.featurize(batches(x, 8), tmp_path / "cpu", progress=False)
    b = gpu.featurize(batches(x, 8), tmp_path / "gpu", progress=False)
    assert a.rows == b.rows == 37
    np.testing.assert_array_equal(a.ids(), b.ids())
    _assert_rows_close(b.load(torch.float64), a.load(torch.float64))
    # The K-FAC statistics (summed on the GPU, kept on the CPU) agree too.
    sa, sb = a.stats(), b.stats()
    assert sorted(sa) == sorted(sb) and sa
    for name in sa:
        torch.testing.assert_close(sb[name], sa[name], rtol=1e-4, atol=1e-8 * sa[name].abs().max())
    # The fingerprint does not depend on the device: the CPU engine opens the GPU's store.
    opened = GradientStore.open(tmp_path / "gpu", fingerprint=cpu.fingerprint())
    assert opened.rows == 37


def _train_images() -> torch.Tensor:
    x = images(150, seed=6)
    x[41] = x[7]  # an exact duplicate pair
    return x


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> tuple[issl.InfluenceSSL, issl.InfluenceSSL, GradientStore]:
    """Both engines fitted on one store (built on the CPU), so their curvatures are identical
    and only the query features and the scans run on different devices."""
    cpu, gpu = _pair(shared=True)
    store = cpu.featurize(batches(_train_images(), 32), tmp_path_factory.mktemp("fitted") / "s",
                          progress=False)
    cpu.fit(store)
    gpu.fit(store)
    return cpu, gpu, store


@pytest.mark.parametrize("opponents", [False, True])
def test_scores_on_the_gpu_are_the_cpu_scores(fitted, cuda_scans, opponents) -> None:
    cpu, gpu, store = fitted
    assert gpu.scan_device.type == "cuda" and cpu.scan_device.type == "cpu"
    queries, qids = images(9, seed=8), torch.arange(1000, 1009)
    exclude = torch.tensor([3, -1, 0, 5, -1, -1, 2, 1, -1])
    top_gpu = gpu.score(queries, topk=6, ids=qids, opponents=opponents, exclude_rows=exclude)
    assert cuda_scans, "the GPU engine's score did not scan on the GPU"
    n_gpu = len(cuda_scans)
    top_cpu = cpu.score(queries, topk=6, ids=qids, opponents=opponents, exclude_rows=exclude)
    assert top_gpu.values.device.type == "cpu" and top_gpu.rows.device.type == "cpu"
    assert len(cuda_scans) == n_gpu  # the CPU engine scanned on the CPU
    S = cpu.score_matrix(queries, ids=qids)  # float64 [9, 150]
    scale = float(S.abs().max())
    for q in range(9):
        rows = top_gpu.rows[q]
        assert int(exclude[q]) not in rows.tolist() or int(exclude[q]) == -1
        # each returned row's score, recomputed on the CPU in float64, is the returned value
        np.testing.assert_allclose(top_gpu.values[q].numpy(), S[q, rows].numpy(),
                                   rtol=0, atol=1e-4 * scale)
        # and the values are the top ones the CPU engine found
        np.testing.assert_allclose(top_gpu.values[q].numpy(), top_cpu.values[q].numpy(),
                                   rtol=0, atol=1e-4 * scale)
    np.testing.assert_array_equal(top_gpu.ids.numpy(), store.ids()[top_gpu.rows.numpy()])


def test_scores_read_the_store_held_on_the_gpu(fitted, monkeypatch) -> None:
    _, gpu, store = fitted
    queries = images(5, seed=9)
    gpu.release_device_memory()
    first = gpu.score(queries, topk=4)
    assert gpu._held is not None
    held = gpu._held[1]
    assert held.device.type == "cuda" and held.shape == (store.rows, store.dim)
    again = gpu.score(queries, topk=4)
    assert gpu._held[1] is held  # reused, not copied again
    torch.testing.assert_close(again.values, first.values, rtol=0, atol=0)
    # With nothing held (over the memory budget) each score streams the shards: same result.
    gpu.release_device_memory()
    monkeypatch.setattr(residency, "RESIDENT_GPU_SHARE", 0.0)
    streamed = gpu.score(queries, topk=4)
    assert gpu._held is None
    np.testing.assert_array_equal(streamed.rows.numpy(), first.rows.numpy())
    torch.testing.assert_close(streamed.values, first.values, rtol=1e-6, atol=1e-7)


def test_duplicates_and_outliers_on_the_gpu_match_the_cpu(fitted, cuda_scans) -> None:
    cpu, gpu, _ = fitted
    d_gpu = gpu.find_duplicates(threshold=0.95)
    assert cuda_scans, "find_duplicates did not scan on the GPU"
    d_cpu = cpu.find_duplicates(threshold=0.95)
    assert d_gpu.rows[0].tolist() == [7, 41]
    assert d_gpu.similarity[0] == pytest.approx(1.0, abs=1e-4)
    # The queries are the same CPU-preconditioned rows: only the scan's summation order differs.
    np.testing.assert_array_equal(d_gpu.rows, d_cpu.rows)
    np.testing.assert_allclose(d_gpu.similarity, d_cpu.similarity, rtol=0, atol=1e-5)
    o_gpu = gpu.find_outliers("neighbours", k=3, normalisation=None)
    o_cpu = cpu.find_outliers("neighbours", k=3, normalisation=None)
    np.testing.assert_allclose(o_gpu.scores, o_cpu.scores, rtol=0, atol=1e-5)


def test_clustered_neighbours_on_the_gpu_match_the_cpu(fitted, cuda_scans) -> None:
    # The index's rows live on the GPU and every cluster's scan runs there; probing every
    # cluster, the search is the exact one on either device.
    cpu, gpu, _ = fitted
    every = apps.ClusteredSearch(clusters=6, probes=6)
    sim_gpu, rows_gpu = gpu.neighbours(3, search=every)
    assert cuda_scans, "the clustered search did not scan on the GPU"
    sim_cpu, rows_cpu = cpu.neighbours(3, search=every)
    exact_sim, exact_rows = cpu.neighbours(3)
    np.testing.assert_array_equal(rows_cpu, exact_rows)
    np.testing.assert_array_equal(rows_gpu, exact_rows)
    np.testing.assert_allclose(sim_gpu, exact_sim, rtol=0, atol=1e-5)
    default = gpu.find_duplicates(threshold=0.95, search=apps.ClusteredSearch())
    assert default.rows[0].tolist() == [7, 41]


def test_a_clustered_index_too_large_for_the_gpu_streams_from_host_memory(
        fitted, cuda_scans, monkeypatch) -> None:
    # An index over the GPU's budget keeps its rows in host memory; the queries stay on the GPU
    # and the top-k kernel streams each probed cluster through it: the same answer.
    cpu, gpu, _ = fitted
    every = apps.ClusteredSearch(clusters=6, probes=6)
    index = apps.clustered_index(gpu.store, gpu.solver, every, device=gpu.device)
    assert index.rows.device.type == "cuda"
    monkeypatch.setattr(residency, "fits", lambda device, nbytes: False)
    streamed = apps.clustered_index(gpu.store, gpu.solver, every, device=gpu.device)
    assert streamed.rows.device.type == "cpu"
    sim, rows = gpu.neighbours(3, search=streamed)
    assert cuda_scans, "the streamed clustered search did not scan on the GPU"
    exact_sim, exact_rows = cpu.neighbours(3)
    np.testing.assert_array_equal(rows, exact_rows)
    np.testing.assert_allclose(sim, exact_sim, rtol=0, atol=1e-5)


def test_transformed_duplicates_on_the_gpu(fitted, cuda_scans) -> None:
    # Transformed copies are featurised on the GPU, preconditioned on the CPU, scanned on the GPU.
    cpu, gpu, _ = fitted
    data = batches(_train_images(), 32)  # the store's examples, as featurize saw them
    shifts = apps.translations(1)
    sim_gpu, rows_gpu = gpu.neighbours(3, data=data, transforms=shifts)
    assert cuda_scans
    sim_cpu, _ = cpu.neighbours(3, data=data, transforms=shifts)
    np.testing.assert_allclose(sim_gpu, sim_cpu, rtol=0, atol=1e-3)
    assert 41 in rows_gpu[7].tolist() and 7 in rows_gpu[41].tolist()


@pytest.mark.parametrize("kind", ["kron", "dense"])
def test_an_attention_model_on_the_gpu_matches_the_cpu(kind) -> None:
    # nn.MultiheadAttention's projections are recorded through F.linear inside the GPU's
    # attention function (attention.py) and sketched by the CUDA kernels like any Linear.
    loss = issl.AugmentationStability(views=2, seed=4, augment=issl.SSLAugment.light(seed=4))
    cpu = issl.InfluenceSSL(tiny_vit(), loss, issl.Projection(kind, k=64, seed=1), "block")
    gpu = copy.deepcopy(cpu)
    gpu.encoder.cuda()
    assert [layer.name for layer in gpu.layout.layers if layer.owner is not None] == [
        "enc.self_attn.in_proj", "enc.self_attn.out_proj"]
    x, ids = images(6, seed=3), torch.arange(6)
    _assert_rows_close(gpu.features(x, ids), cpu.features(x, ids))


class _Noise:
    """Seeded views ``x + 0.3 (u - 1/2)`` of any shape (a video's), made on x's device."""

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, view: int) -> torch.Tensor:
        u = torch.from_numpy(view_uniforms(1, ids, view, x[0].numel())).reshape(x.shape)
        return x + 0.3 * (u.to(x) - 0.5)

    def config(self) -> dict:
        return {"kind": "Noise", "scale": 0.3}


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("kind", ["kron", "dense"])
def test_1d_and_3d_convolutions_on_the_gpu_match_the_cpu(kind) -> None:
    # Conv1d / Conv3d (grouped, dilated, every padding mode) through cuDNN's 1-D and 3-D
    # convolutions (kron: the conv by P_in; grouped: the exact gradient) and the CUDA sketches;
    # SignalAugment's views made on the GPU equal the CPU's; a clip's frames folded into a
    # Conv2d's batch.
    for model, x, augment in (
            (Signal1d(), torch.rand(7, 3, 23), issl.SignalAugment(seed=2, reverse_p=0.5)),
            (Video3d(), torch.rand(5, 2, 5, 7, 6), _Noise()),
            (FoldedFrames(), torch.rand(4, 3, 2, 7, 6), _Noise())):
        loss = issl.AugmentationStability(views=2, augment=augment)
        cpu = issl.InfluenceSSL(model, loss, issl.Projection(kind, k=64, seed=1), "block")
        gpu = copy.deepcopy(cpu)
        gpu.encoder.cuda()
        ids = torch.arange(10, 10 + x.shape[0])
        _assert_rows_close(gpu.features(x, ids), cpu.features(x, ids))


def test_the_engine_follows_its_encoder_to_the_gpu() -> None:
    attr = cnn_attribution("block", "kron")
    x = images(5)
    before = attr.features(x)
    assert before.device.type == "cpu"
    attr.encoder.cuda()  # moved after the attribution object was built
    assert attr.device.type == "cuda"
    after = attr.features(x)
    assert after.device == attr.device
    _assert_rows_close(after, before)


def test_the_demo_on_the_gpu_finds_the_planted_problems(tmp_path) -> None:
    # End to end with the encoder trained on the GPU (its weights differ from a CPU run's by
    # float rounding, so the bar is the CPU demo test's, not equality with a CPU run).
    from issl_fast.demo import DemoConfig, run_demo

    cfg = DemoConfig(out=str(tmp_path), epochs=6, n_train=300, n_exact=8, n_near=4,
                     n_outliers=9, views=4, n_queries=4, topk=4, n_boot=50, progress=False,
                     device="cuda")
    s = run_demo(cfg, log=lambda msg: None)
    assert s["store"]["rows"] == 300 + 8 + 4 + 9
    assert s["quality"]["duplicates_influence"]["recall"] >= 0.8
    assert s["quality"]["duplicates_by_kind_influence"]["shift"] == 1.0
    assert s["quality"]["outliers_influence"]["auroc"] >= 0.8
