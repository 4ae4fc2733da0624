"""One launch of each main CUDA kernel at the issue-5 benchmark shapes, for Nsight Compute
(bench/gpu/run.sh with ISSL_GPU_NCU=1 runs this under ``ncu --kernel-name regex:...``). No warm-up
and no timing: ncu replays each profiled launch itself, and a warm-up would be profiled instead.
Order: sketch_kron, sketch_linear (the default kernel, then the experimental linear_ws,
linear_ws_pair and linear_ws_regs), then score_topk with bfloat16 queries at m = 16, 64 and 1024
(the default kernels; ``extra`` lists experimental variants to profile as well: m = 64 again with
score_prepass, m = 1024 again with score_pace)."""

from __future__ import annotations

import torch
from issl_fast import _cuda_ops, ops


def main() -> None:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    A = torch.randn(64, 256, 1024, device=dev, dtype=torch.bfloat16)
    D = torch.randn(64, 256, 1024, device=dev, dtype=torch.bfloat16)
    ops.sketch_kron(A, D, 64, 64, seed=2)
    A = torch.randn(256, 1, 1024, device=dev, dtype=torch.bfloat16)
    D = torch.randn(256, 1, 1024, device=dev, dtype=torch.bfloat16)
    default = list(_cuda_ops.default_variants())
    ops.sketch_linear(A, D, 4096, seed=1)
    for extra in ("linear_ws", "linear_ws_pair", "linear_ws_regs"):
        with _cuda_ops.variants(default + [extra]):
            ops.sketch_linear(A, D, 4096, seed=1)
    del A, D
    G = torch.randn(4_000_000, 1024, device=dev, dtype=torch.bfloat16)
    for m, extra in ((16, []), (64, []), (64, ["score_prepass"]), (1024, []),
                     (1024, ["score_pace"])):
        Q = torch.randn(m, 1024, device=dev).to(torch.bfloat16)
        with _cuda_ops.variants(default + extra):
            ops.score_topk(Q, G, 100)
    torch.cuda.synchronize()
    print("profiled launches queued: kron, linear, linear_ws, linear_ws_pair, linear_ws_regs,"
          " score m=16, 64, 64 with the pre-pass (2 scorer launches), 1024, 1024 paced")


if __name__ == "__main__":
    main()
