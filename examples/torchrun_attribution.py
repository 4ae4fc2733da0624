"""Influence-SSL on several processes with torchrun (or on one, without it).

    torchrun --standalone --nproc_per_node=2 examples/torchrun_attribution.py OUT
    python examples/torchrun_attribution.py OUT          # the same answer from one process

Every rank runs this same script with the same weights, data and queries; InfluenceSSL splits
the work over the ranks (featurize by batches, fit and scans by store rows) and every rank gets
the whole answer. Ranks use the GPU of their LOCAL_RANK when there is one (nccl), else the CPU
(gloo). The data are scikit-learn's digits with a few planted copies; the encoder is a small CNN
(random weights here: put your trained encoder in its place). Rank 0 writes OUT/result.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import issl_fast as issl
import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

COPIES = [(3, 200), (10, 301), (42, 402)]  # (original, copy) rows of the planted duplicates
QUERIES = 3  # the last rows are the queries, not training examples
# Fewest examples: every planted copy among the training rows, then the queries.
MIN_EXAMPLES = max(copy for _, copy in COPIES) + 1 + QUERIES
DIGITS = 1797  # images in scikit-learn's digits


def _examples(text: str) -> int:
    """--examples: enough rows for the planted copies and the queries, at most the digits."""
    value = int(text)
    if not MIN_EXAMPLES <= value <= DIGITS:
        raise argparse.ArgumentTypeError(
            f"must be between {MIN_EXAMPLES} (the planted copies, the last at row "
            f"{MIN_EXAMPLES - QUERIES - 1}, and {QUERIES} queries) and {DIGITS} (the digits), "
            f"got {value}")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory for the store and result.json")
    parser.add_argument("--examples", type=_examples, default=503,
                        help=f"digits used, the last {QUERIES} as queries "
                        f"({MIN_EXAMPLES}-{DIGITS}; default 503)")
    args = parser.parse_args(argv)

    device = torch.device("cpu")
    if "WORLD_SIZE" in os.environ:  # launched by torchrun: one process per rank
        if torch.cuda.is_available() and issl.has_cuda():  # (a GPU and a build for it)
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0

    digits = torch.tensor(load_digits().images[: args.examples], dtype=torch.float32) / 16.0
    x = digits[:, None]  # [n, 1, 8, 8]
    for original, copy in COPIES:
        x[copy] = x[original]
    train = DataLoader(TensorDataset(x[: args.examples - QUERIES]), batch_size=64)
    queries = x[args.examples - QUERIES :]

    torch.manual_seed(0)  # the same weights on every rank
    encoder = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 3 * 3, 32), nn.Tanh(), nn.Linear(32, 16),
    ).to(device).eval()
    attr = issl.InfluenceSSL(
        encoder,
        # shared views: every image gets the same transforms, so exact copies get equal features
        loss=issl.AugmentationStability(
            views=2, augment=dataclasses.replace(issl.SSLAugment.light(seed=0), shared=True)),
        projection=issl.Projection("kron", k=64),
        solver="ekfac",
        distributed=dist.is_initialized(),  # split the work over the ranks (all call alike)
    )
    store = attr.featurize(train, args.out / "store", progress=rank == 0)
    attr.fit(store)
    top = attr.score(queries, topk=5)
    dups = attr.find_duplicates(threshold=0.99, topk=3)
    outliers = attr.find_outliers("self_influence")
    if rank == 0:
        result = {
            "ranks": dist.get_world_size() if dist.is_initialized() else 1,
            "top_ids": top.ids.tolist(),
            "top_values": top.values.tolist(),
            "duplicate_ids": sorted(sorted(p) for p in dups.ids.tolist()),
            "most_outlying_ids": outliers.ids[:5].tolist(),
        }
        (args.out / "result.json").write_text(json.dumps(result, indent=1))
        print(json.dumps({k: result[k] for k in ("ranks", "duplicate_ids")}))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
