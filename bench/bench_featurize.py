"""featurize (the engine's hot path) on a ~1M-parameter CNN, 32x32x3 inputs, K=2 views, kron
projection, batch 64.

Issue-3 targets:
- time within 2x of one plain forward+backward of the same loss on the same batch (the floor:
  the model's own work, weight gradients included, views precomputed);
- >= 10x faster than the pipeline a PyTorch user writes today: torch.func per-example gradients
  (vmap(grad)) + a dense +-1 projection regenerated in column blocks with torch's RNG (TRAK's CPU
  approach), to the same feature dimension;
- peak memory >= 5x lower than that pipeline (peak RSS growth of a fresh subprocess running one
  batch after setup, so allocator caches of other cases don't blur it).
Also: the kron kernel alone vs the same kron math in plain torch (einsum), on the factors the
hooks captured for this batch, so the kernel's gain is visible apart from the algorithm's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import issl_fast as issl
import pytest
import torch
from _bench import NUM_THREADS, Target, get_case, ops, record, timed
from _featurize_model import VIEWS, B, baseline_pipeline, build
from issl_fast.capture import FactorCapture

K = 256
TRAK_BLOCK = 512  # output columns of the +-1 matrix generated per block (TRAK's CPU projector)
ROUNDS = {"ours": 5, "floor": 5, "baseline": 2}

_state: dict = {}


def _setup() -> dict:
    if _state:
        return _state
    model, loss, x, ids = build(NUM_THREADS)
    attr = issl.InfluenceSSL(model, loss, issl.Projection("kron", k=K), "block",
                             num_threads=NUM_THREADS)
    views = loss.encoder_inputs(x, ids)
    with FactorCapture(attr.layout) as cap:
        cap.backward(loss.from_outputs(model(views), B).sum())
        factors = [cap.factors(layer, loss.groups) for layer in attr.layout.layers]
    # featurize itself sketches conv layers with conv2d (no im2col); the kernel comparison below
    # runs on the im2col factors, i.e. what sketch_kron gets for Linear layers / dense mode.
    mats = [attr.featurizer._projections(b, layer.d_in, layer.d_out)
            for b, layer in zip(attr.featurizer.blocks, attr.layout.layers)]
    _state.update(model=model, loss=loss, x=x, ids=ids, attr=attr, views=views, factors=factors,
                  mats=mats, params=sum(p.numel() for p in model.parameters()))
    return _state


def _case():
    return get_case(
        "featurize", f"CNN ~1M params 32x32x3 B{B} K{VIEWS} kron k{K}",
        targets=[Target("<=2x fwd+bwd", "speedup", 0.5, vs="floor"),
                 Target(">=10x torch.func+TRAK", "speedup", 10.0, vs="baseline"),
                 Target("peak mem <=1/5 baseline", "info_le", 0.2, key="peak_mem_ratio")])


def _kron_case():
    return get_case("featurize", "kron of captured im2col factors: kernel vs torch einsum",
                    targets=[Target("info: kernel gain", "speedup", 1.0, vs="torch_einsum")])


def _floor(st):
    model, loss, views = st["model"], st["loss"], st["views"]
    model.zero_grad(set_to_none=True)
    loss.from_outputs(model(views), B).sum().backward()


@pytest.mark.parametrize("role", list(ROUNDS))
def bench_featurize(benchmark, role):
    st = _setup()
    c = _case()
    c.info["params"] = st["params"]
    c.info["feature_dim"] = st["attr"].dim
    benchmark.group = f"featurize {c.case}"
    gen = torch.Generator().manual_seed(0)
    fns = {
        "ours": ("issl_fast featurize (augment + fwd + bwd to outputs + kron)",
                 lambda: st["attr"].featurizer(st["x"], st["ids"])),
        "floor": ("plain forward+backward of the loss (views precomputed)", lambda: _floor(st)),
        "baseline": ("torch.func per-example grads + TRAK-style +-1 blocks",
                     lambda: baseline_pipeline(st["model"], st["loss"], st["x"], st["ids"],
                                               st["attr"].dim, gen, TRAK_BLOCK)),
    }
    name, fn = fns[role]
    _, med = timed(benchmark, fn, rounds=ROUNDS[role])
    record(benchmark, c, role, name, med, ROUNDS[role])
    if role == "ours":
        t_aug = min(timed_once(lambda: st["loss"].encoder_inputs(st["x"], st["ids"]))
                    for _ in range(3))
        c.info["augment_s"] = t_aug
    if role == "baseline":
        mem = {r: _peak_rss_mb(r) for r in ("ours", "baseline")}
        c.info.update(peak_mem_mb_ours=mem["ours"], peak_mem_mb_baseline=mem["baseline"],
                      peak_mem_ratio=mem["ours"] / mem["baseline"])


def timed_once(fn) -> float:
    import time

    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@pytest.mark.parametrize("role", ["ours", "torch_einsum"])
def bench_featurize_kron_kernel(benchmark, role):
    st = _setup()
    c = _kron_case()
    blocks = st["attr"].featurizer.blocks

    def ours():
        return [ops.sketch_kron(A, D, b.k_in, b.k_out, seed=b.seed, num_threads=NUM_THREADS)
                for (A, D), b in zip(st["factors"], blocks)]

    def torch_math():
        out = []
        for (A, D), (p_in, p_out) in zip(st["factors"], st["mats"]):
            U, V = A @ p_in.T, D @ p_out.T
            out.append(torch.einsum("bta,btc->bac", V, U).reshape(A.shape[0], -1))
        return out

    if role == "ours":  # same numbers first
        for a, b in zip(ours(), torch_math()):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5 * b.abs().max().item())
    fn = ours if role == "ours" else torch_math
    _, med = timed(benchmark, fn, rounds=10)
    record(benchmark, c, role, "issl_fast sketch_kron" if role == "ours" else "torch einsum", med,
           10)


def _peak_rss_mb(role: str) -> float:
    """Peak RSS growth (MB) of a fresh process running one batch of `role` after its setup:
    the kernel's high-water mark is reset (clear_refs 5) just before the call and read after."""
    here = Path(__file__).parent
    code = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(here)!r})
        import torch
        import issl_fast as issl
        from _featurize_model import baseline_pipeline, build

        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key + ":"):
                    return int(line.split()[1])

        model, loss, x, ids = build({NUM_THREADS})
        attr = issl.InfluenceSSL(model, loss, issl.Projection("kron", k={K}), "block",
                                 num_threads={NUM_THREADS})
        attr.featurizer(x[:2], ids[:2])  # warm up libraries at a tiny size
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = status("VmRSS")
        if {role!r} == "ours":
            attr.featurizer(x, ids)
        else:
            baseline_pipeline(model, loss, x, ids, attr.dim, torch.Generator().manual_seed(0))
        print(json.dumps({{"delta_kb": status("VmHWM") - before}}))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=here)
    delta = json.loads(out.stdout.strip().splitlines()[-1])["delta_kb"] / 1024.0
    if delta <= 0:
        raise AssertionError(f"peak RSS growth of {role} measured as {delta} MB: {out.stdout}")
    return delta
