"""build_info(), the SIMD level controls and the ``info`` command line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import issl_fast
import pytest
import torch
from issl_fast import _backend

EXPECTED_TYPES: dict[str, tuple[type, ...]] = {
    "version": (str,),
    "hash_version": (int,),
    "cuda_compiled": (bool,),
    "cuda_version": (str, type(None)),
    "cuda_architectures": (str, type(None)),
    "cuda_devices": (int,),
    "cuda_error": (str, type(None)),
    "openmp_max_threads": (int,),
    "torch_threads": (int,),
    "simd_level": (str,),
    "simd_supported": (str,),
    "torch_version": (str,),
    "machine": (str,),
    "python": (str,),
    "distributed_backends": (str, type(None)),
}


def test_build_info_keys_and_types() -> None:
    info = issl_fast.build_info()
    missing = set(EXPECTED_TYPES) - set(info)
    assert not missing, f"build_info() lacks {sorted(missing)}"
    for key, types in EXPECTED_TYPES.items():
        assert isinstance(info[key], types), f"{key}={info[key]!r} is not {types}"
    assert info["version"] == issl_fast.__version__
    assert info["hash_version"] == issl_fast.reference.HASH_VERSION == 1
    assert info["torch_version"] == torch.__version__
    assert info["openmp_max_threads"] >= 1 and info["torch_threads"] >= 1
    assert info["cuda_devices"] >= 0
    if not info["cuda_compiled"]:
        assert info["cuda_devices"] == 0 and info["cuda_version"] is None
    assert issl_fast.has_cuda() == (info["cuda_compiled"] and info["cuda_devices"] > 0
                                    and torch.cuda.is_available())
    if torch.distributed.is_available():  # what the scale-out tests use here
        assert "gloo" in info["distributed_backends"].split(",")
    json.dumps(info)  # serialisable as the CLI's --json output


def test_simd_level_in_use_is_supported() -> None:
    levels = _backend.supported_simd_levels()
    assert levels[0] == "generic" and set(levels) <= set(_backend.SIMD_LEVELS)
    info = issl_fast.build_info()
    assert info["simd_level"] in levels
    assert info["simd_level"] == _backend.simd_level()
    assert info["simd_supported"] == levels[-1]


def test_set_simd_level_round_trip_and_errors() -> None:
    try:
        for level in _backend.supported_simd_levels():
            _backend.set_simd_level(level)
            assert _backend.simd_level() == level == issl_fast.build_info()["simd_level"]
        with pytest.raises(ValueError, match="'sse9'"):
            _backend.set_simd_level("sse9")
    finally:
        _backend.set_simd_level(_backend.supported_simd_levels()[-1])


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def test_python_m_info_prints_version() -> None:
    r = _run([sys.executable, "-m", "issl_fast", "info"])
    assert r.returncode == 0, r.stderr
    lines = {line.split()[0]: line.split(None, 1)[1] for line in r.stdout.splitlines() if line}
    assert lines["version"].strip() == issl_fast.__version__
    assert lines["simd_level"].strip() in _backend.supported_simd_levels()


def test_console_script_info_json() -> None:
    exe = shutil.which("issl-fast")
    if exe is None:
        pytest.skip("the issl-fast console script is not on PATH (package not pip-installed?)")
    r = _run([exe, "info", "--json"])
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["version"] == issl_fast.__version__
    assert info["hash_version"] == 1
    assert info["simd_level"] in _backend.supported_simd_levels()


def test_cli_without_command_fails() -> None:
    r = _run([sys.executable, "-m", "issl_fast"])
    assert r.returncode != 0 and "info" in r.stderr
