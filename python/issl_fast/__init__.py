"""issl_fast: label-free influence functions (Influence-SSL) for self-supervised encoders.

Start with :class:`InfluenceSSL` (featurize -> fit -> score / self_influence). The kernel layer
lives in :mod:`issl_fast.ops` (fused sketches and streaming top-k scoring, CPU
and CUDA backends) with a pure-PyTorch twin in :mod:`issl_fast.reference`.
"""

from __future__ import annotations

import torch  # noqa: F401  (first: torch's libgomp must be the one our OpenMP code binds to)

from . import ops, reference
from ._backend import build_info, has_cuda
from .augment import SSLAugment
from .augment_signal import SignalAugment
from .influence import InfluenceSSL, TopInfluence
from .loss import AugmentationStability
from .ops import score_topk, sketch_dense, sketch_kron, sketch_linear, sketch_sparse
from .projection import Projection
from .solver import Solver
from .store import GradientStore, StoreError

__version__ = "0.1.0"

__all__ = [
    "AugmentationStability",
    "GradientStore",
    "InfluenceSSL",
    "Projection",
    "SSLAugment",
    "SignalAugment",
    "Solver",
    "StoreError",
    "TopInfluence",
    "build_info",
    "has_cuda",
    "ops",
    "reference",
    "score_topk",
    "sketch_dense",
    "sketch_kron",
    "sketch_linear",
    "sketch_sparse",
]
