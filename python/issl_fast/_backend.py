"""Loads the compiled module once and reports what this build can do."""

from __future__ import annotations

import functools
import os
import platform
from typing import Any

import torch  # imported before _C: torch's libgomp is then the one our OpenMP kernels bind to

from . import _C  # type: ignore[attr-defined]  # noqa: E402  (the compiled module, no stub)

SIMD_LEVELS = ("generic", "avx2", "avx512")
# Element-type codes of the binding ABI (csrc/include/issl_fast/common.h, enum DType).
TORCH_DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@functools.lru_cache(maxsize=1)
def _cuda_devices() -> tuple[int, str]:
    """(device count, error message) from the CUDA runtime our module was built against."""
    if not hasattr(_C, "cuda_device_count"):
        return 0, "issl_fast was built without CUDA"
    count, code, message = _C.cuda_device_count()
    return count, (f"cudaGetDeviceCount failed with error {code}: {message}" if code else "")


def cuda_compiled() -> bool:
    """True if the CUDA backend was compiled into this build."""
    return bool(_C.build_info()["cuda_compiled"])


def has_cuda() -> bool:
    """True if CUDA kernels are compiled in and a CUDA device is usable (by us and by torch)."""
    return cuda_compiled() and _cuda_devices()[0] > 0 and torch.cuda.is_available()


def build_info() -> dict[str, Any]:
    """What this build contains and what it found at run time.

    Keys: version, hash_version, cuda_compiled, cuda_version, cuda_architectures, cuda_devices,
    cuda_error, openmp_max_threads, torch_threads, simd_level (in use), simd_supported (best this
    CPU allows), torch_version, machine, python, simd_env, distributed_backends (torch.distributed
    backends for several ranks, e.g. "gloo,nccl"; None without torch.distributed).
    """
    info = dict(_C.build_info())
    count, err = _cuda_devices()
    info["cuda_devices"] = count
    info["cuda_error"] = err or None
    info["torch_version"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
    info["machine"] = platform.machine()
    info["python"] = platform.python_version()
    info["simd_env"] = os.environ.get("ISSL_FAST_SIMD")
    info["distributed_backends"] = _distributed_backends()
    return info


def _distributed_backends() -> str | None:
    """The torch.distributed backends this torch offers (scale-out, :mod:`.distributed`)."""
    import torch.distributed as dist

    if not dist.is_available():
        return None
    names = {"gloo": dist.is_gloo_available(), "nccl": dist.is_nccl_available(),
             "mpi": dist.is_mpi_available()}
    return ",".join(name for name, ok in names.items() if ok) or None


def simd_level() -> str:
    """SIMD level the CPU kernels use now: 'generic', 'avx2' or 'avx512'."""
    return _C.simd_level()


def set_simd_level(level: str) -> None:
    """Force the CPU kernels' SIMD level (tests, benchmarks); ValueError if the CPU lacks it."""
    if level not in SIMD_LEVELS:
        raise ValueError(f"simd level must be one of {SIMD_LEVELS}, got {level!r}")
    _C.set_simd_level(level)


def supported_simd_levels() -> tuple[str, ...]:
    """Every level this CPU can run, from generic to the best."""
    best = _C.build_info()["simd_supported"]
    return SIMD_LEVELS[: SIMD_LEVELS.index(best) + 1]
