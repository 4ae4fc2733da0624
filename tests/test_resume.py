"""A featurisation killed part-way (SIGKILL of a real subprocess) resumes to a store identical to
an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from engine_models import batches, cnn_attribution, images

N, BATCH, SHARD = 48, 4, 8
TESTS_DIR = Path(__file__).parent

CHILD = textwrap.dedent(
    f"""
    import sys, time
    sys.path.insert(0, {str(TESTS_DIR)!r})
    from engine_models import batches, cnn_attribution, images

    def slow(items):
        for item in items:
            time.sleep(0.15)  # leaves the parent time to kill us mid-run
            yield item

    cnn_attribution().featurize(slow(batches(images({N}), {BATCH})), sys.argv[1],
                                shard_rows={SHARD}, progress=False)
    """
)


def _rows_written(path: Path) -> int:
    try:
        return json.loads((path / "manifest.json").read_text())["rows"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def test_sigkill_mid_run_then_resume_is_identical(tmp_path) -> None:
    killed = tmp_path / "killed"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(script), str(killed)], env=env)
    try:
        deadline = time.monotonic() + 120
        while _rows_written(killed) < 2 * SHARD and time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the child finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    manifest = json.loads((killed / "manifest.json").read_text())
    assert not manifest["complete"]
    assert 0 < manifest["rows"] < N

    resumed = cnn_attribution().featurize(
        batches(images(N), BATCH), killed, shard_rows=SHARD, progress=False
    )
    clean = cnn_attribution().featurize(
        batches(images(N), BATCH), tmp_path / "clean", shard_rows=SHARD, progress=False
    )
    assert resumed.complete and resumed.rows == clean.rows == N
    got = json.loads((killed / "manifest.json").read_text())["shards"]
    want = json.loads((tmp_path / "clean" / "manifest.json").read_text())["shards"]
    assert got == want  # same files, same SHA-256 per shard
    leftovers = [p.name for p in killed.iterdir() if p.suffix == ".tmp"]
    assert not leftovers or all(
        p.startswith(("phi_", "ids_", "stats_", "manifest")) for p in leftovers
    )
