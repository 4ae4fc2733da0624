"""When a scan holds a whole store on its device instead of streaming it shard by shard.

Scans that pass over the same store many times (duplicate search: one pass per 4096 queries;
repeated ``InfluenceSSL.score`` calls on a GPU, where every pass would otherwise cross PCIe) keep
one copy on the scan device when it fits this budget; otherwise they stream, in bounded memory.
"""

from __future__ import annotations

import torch

# At most this many bytes on the CPU (a copy there only saves re-reading / re-normalising).
RESIDENT_CPU_BYTES = 1 << 28
# At most this share of a GPU's free memory (the rest stays for the model and the user).
RESIDENT_GPU_SHARE = 0.5


def fits(device: torch.device, nbytes: int) -> bool:
    """Whether ``nbytes`` may be held on ``device`` for a scan."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return nbytes <= RESIDENT_GPU_SHARE * free
    return nbytes <= RESIDENT_CPU_BYTES
