#!/usr/bin/env bash
# One-shot GPU validation of the CUDA backend (issue 5): build for this GPU only, run the `cuda`
# tests with ISSL_FAST_REQUIRE_CUDA=1 (so nothing can skip silently), then the GPU benchmarks.
#
# Needs: an NVIDIA GPU, nvcc, and python3 with torch, pybind11, scikit-build-core, cmake, ninja,
# pytest, hypothesis, numpy already installed. No network. Run from anywhere:
#     bash bench/gpu/run.sh            # logs in $OUT (default bench/gpu/out/)
# Environment: OUT (log folder), PYTHON (interpreter, default python3), ISSL_GPU_ARCH (e.g. 90,
# to skip detection), ISSL_GPU_SKIP_BENCH=1 (tests only), ISSL_GPU_PIP_TARGET (install into that
# folder instead of the environment), ISSL_GPU_RUN_SECONDS (overall limit, default 460),
# ISSL_GPU_TEST_FILTER (a pytest -k expression for the cuda tests, e.g. "sparse"),
# ISSL_GPU_BENCH_ONLY (benchmarks to run, e.g. "kron sparse variants"; names: linear kron score
# sparse dense featurize variants; default all),
# ISSL_GPU_BUILD_DIR (a build folder kept for incremental rebuilds on a warm machine),
# ISSL_GPU_NCU=1 (after the benchmarks, Nsight Compute sections of the main kernels into ncu.txt).
# The cuda tests run up to three times: as they are (the default kernel variants), then the
# sketch and score tests with ISSL_FAST_CUDA_VARIANTS=none (the portable kernels other GPUs run)
# and, when the build has experimental variants, =all; the last benchmark compares each variant
# with the kernel it replaces.
# Files written to $OUT (at most 8, flat): env.txt build.log tests.log bench.log bench.json
# table.txt summary.txt (ncu.txt). Exit status: non-zero if the build or any test failed
# (benchmarks that miss a target do not fail the run; their table says PASS/FAIL).
# Time: about 1-2 min build (one architecture), 1-3 min tests, 2-3 min benchmarks; each stage's
# time limit is cut to what is left of 460 s (ISSL_GPU_RUN_SECONDS), so the run ends within 8 min.
# A stage that hits its limit counts as failed (tests) or leaves a partial table (benchmarks).
set -euo pipefail

cd "$(dirname "$0")/../.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/bench/gpu/out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# The default kernel variants unless a stage says otherwise (the later test passes, the
# benchmark's variants step).
unset ISSL_FAST_CUDA_VARIANTS
T0=$(date +%s)
# Every stage's time limit is cut to what is left of the whole run's (460 s, under 8 minutes),
# keeping `reserve` seconds for the stages after it.
DEADLINE=$(( T0 + ${ISSL_GPU_RUN_SECONDS:-460} ))
limit() {  # limit MAX RESERVE -> seconds for the next stage
  local left=$(( DEADLINE - $(date +%s) - $2 ))
  if [ "$left" -gt "$1" ]; then left=$1; fi
  if [ "$left" -lt 10 ]; then left=10; fi
  echo "$left"
}
stamp() { echo "[run.sh +$(( $(date +%s) - T0 ))s] $*"; }

if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="$PATH:/usr/local/cuda/bin"
fi

# ---- environment --------------------------------------------------------------------------------
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo '?') $(git status --short 2>/dev/null | wc -l) changed files"
  echo "python: $($PY -c 'import sys; print(sys.version)' 2>&1)"
  echo "torch: $($PY -c 'import torch; print(torch.__version__, torch.version.cuda)' 2>&1)"
  echo "nvcc: $(nvcc --version 2>&1 | tail -n 2 | head -n 1)"
  nvidia-smi 2>&1 || echo "nvidia-smi failed"
} > "$OUT/env.txt" 2>&1

ARCH=${ISSL_GPU_ARCH:-}
if [ -z "$ARCH" ]; then
  ARCH=$(timeout 120 "$PY" -c 'import torch; M, m = torch.cuda.get_device_capability(0); print(f"{M}{m}")' 2>>"$OUT/env.txt" || true)
fi
if [ -z "$ARCH" ]; then
  ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d '. ' || true)
fi
if [ -z "$ARCH" ]; then
  stamp "no GPU found (torch.cuda and nvidia-smi both failed; see $OUT/env.txt)"
  exit 2
fi
stamp "GPU compute capability $ARCH: building for ${ARCH}-real only"
echo "arch: $ARCH" >> "$OUT/env.txt"

# ---- build --------------------------------------------------------------------------------------
# A private build folder, so a stale one from another machine is never reused.
# ISSL_GPU_BUILD_DIR=DIR keeps the build folder for the next call on the same (warm) machine, so a
# follow-up run after a one-file fix rebuilds only that file.
if [ -n "${ISSL_GPU_BUILD_DIR:-}" ]; then
  BUILD_DIR=$ISSL_GPU_BUILD_DIR
  mkdir -p "$BUILD_DIR"
else
  BUILD_DIR=$(mktemp -d /tmp/issl_gpu_build.XXXXXX)
fi
# ISSL_GPU_PIP_TARGET=DIR installs into DIR (put first on PYTHONPATH) instead of the environment.
TARGET_ARGS=()
if [ -n "${ISSL_GPU_PIP_TARGET:-}" ]; then
  TARGET_ARGS=(--target "$ISSL_GPU_PIP_TARGET" --upgrade)
  export PYTHONPATH="$ISSL_GPU_PIP_TARGET${PYTHONPATH:+:$PYTHONPATH}"
fi
set +e
ISSL_FAST_CUDA=ON ISSL_FAST_CUDA_ARCHS="${ARCH}-real" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
  timeout "$(limit 300 200)" "$PY" -m pip install --no-build-isolation --no-deps --no-cache-dir -v \
  ${TARGET_ARGS[@]+"${TARGET_ARGS[@]}"} -C build-dir="$BUILD_DIR" -C cmake.define.ISSL_FAST_CUDA=ON . \
  > "$OUT/build.log" 2>&1
rc=$?
set -e
if [ $rc -ne 0 ]; then
  tail -n 40 "$OUT/build.log"
  stamp "BUILD FAILED (exit $rc); full log in $OUT/build.log"
  exit 3
fi
stamp "built ($(grep -c 'Building CUDA object' "$OUT/build.log" || true) CUDA objects)"
# The runtime's own view (cuda_devices, cuda_error: e.g. a driver older than the toolkit) on
# stdout too, so a run whose tests all fail says why at once.
(cd /tmp && "$PY" -c 'import issl_fast, json; print(json.dumps(issl_fast.build_info()))') \
  2>&1 | tee -a "$OUT/env.txt" | tail -n 3 || true

# ---- tests --------------------------------------------------------------------------------------
# The canary and host tests (unmarked), every `cuda`-marked test of the suite. -rs lists skips.
# A hung kernel would otherwise eat the whole stage silently: with pytest-timeout, a test over
# 90 s dumps every thread's stack (naming the test) and ends the run.
PT_TIMEOUT=()
if "$PY" -c 'import pytest_timeout' >/dev/null 2>&1; then
  PT_TIMEOUT=(--timeout=90 --timeout_method=thread)
fi
# ~830 cuda tests, much of their time in the CPU references: 4 pytest-xdist workers (4 OpenMP
# threads each on 16 cores) when the plugin is there, so a slow build still leaves them time.
PT_XDIST=()
if "$PY" -c 'import xdist' >/dev/null 2>&1; then
  PT_XDIST=(-n 4)
fi
set +e
ISSL_FAST_REQUIRE_CUDA=1 timeout "$(limit 60 180)" "$PY" -m pytest -q -rs -p no:cacheprovider \
  tests/test_cuda_canary.py tests/test_cuda_host.py > "$OUT/tests.log" 2>&1
rc_canary=$?
PT_FILTER=()
if [ -n "${ISSL_GPU_TEST_FILTER:-}" ]; then PT_FILTER=(-k "$ISSL_GPU_TEST_FILTER"); fi
ISSL_FAST_REQUIRE_CUDA=1 OMP_NUM_THREADS=4 timeout "$(limit 240 100)" "$PY" -m pytest -q -rfEs \
  -p no:cacheprovider -m cuda ${PT_XDIST[@]+"${PT_XDIST[@]}"} ${PT_TIMEOUT[@]+"${PT_TIMEOUT[@]}"} \
  ${PT_FILTER[@]+"${PT_FILTER[@]}"} --durations=15 tests >> "$OUT/tests.log" 2>&1
rc_cuda=$?
# The sketch and score tests again with other variant sets (cuda_ops.h: CudaVariant), each in
# processes of its own (the set is read at import; a faulting kernel poisons its process's CUDA
# context): "none" runs the portable kernels, the ones GPUs without the variants' hardware run;
# "all" adds the experimental variants, so the whole suite checks one before it becomes a default.
variant_pass() {  # variant_pass SET LIMIT
  echo "== pass with ISSL_FAST_CUDA_VARIANTS=$1" >> "$OUT/tests.log"
  ISSL_FAST_CUDA_VARIANTS=$1 ISSL_FAST_REQUIRE_CUDA=1 OMP_NUM_THREADS=4 \
    timeout "$2" "$PY" -m pytest -q -rfEs -p no:cacheprovider -m cuda \
    ${PT_XDIST[@]+"${PT_XDIST[@]}"} ${PT_TIMEOUT[@]+"${PT_TIMEOUT[@]}"} \
    ${PT_FILTER[@]+"${PT_FILTER[@]}"} tests/test_cuda_sketches.py tests/test_cuda_score_topk.py \
    >> "$OUT/tests.log" 2>&1
}
variant_pass none "$(limit 120 110)"
rc_none=$?
N_EXP=$(cd /tmp && "$PY" -c 'import torch, issl_fast
from issl_fast import _cuda_ops
print(len(_cuda_ops.experimental_variants()))' 2>/dev/null || echo 1)
if [ "$N_EXP" = "0" ]; then  # "all" is the default set: the first pass ran it
  echo "== no experimental variants in this build: no pass with ISSL_FAST_CUDA_VARIANTS=all" \
    >> "$OUT/tests.log"
  rc_all=0
else
  variant_pass all "$(limit 120 90)"
  rc_all=$?
fi
set -e
tail -n 25 "$OUT/tests.log"
tests_ok=1
if [ $rc_canary -ne 0 ] || [ $rc_cuda -ne 0 ] || [ $rc_none -ne 0 ] || [ $rc_all -ne 0 ]; then
  tests_ok=0
fi
TEST_RCS="canary/host exit $rc_canary, cuda exit $rc_cuda, variants none exit $rc_none, all exit $rc_all"
stamp "tests: $TEST_RCS"

# ---- benchmarks ---------------------------------------------------------------------------------
rc_bench=0
if [ "${ISSL_GPU_SKIP_BENCH:-0}" != "1" ]; then
  set +e
  BENCH_ONLY=()
  # shellcheck disable=SC2206  # word splitting of the list is intended
  if [ -n "${ISSL_GPU_BENCH_ONLY:-}" ]; then BENCH_ONLY=(--only $ISSL_GPU_BENCH_ONLY); fi
  timeout "$(limit 300 5)" "$PY" bench/gpu/bench_gpu.py --out "$OUT" \
    ${BENCH_ONLY[@]+"${BENCH_ONLY[@]}"} > "$OUT/bench.log" 2>&1
  rc_bench=$?
  set -e
  stamp "benchmarks exit $rc_bench (log: $OUT/bench.log)"
  if [ $rc_bench -ne 0 ]; then tail -n 30 "$OUT/bench.log"; fi
fi

# ---- profile (optional) -------------------------------------------------------------------------
# Nsight Compute's speed-of-light, warp-state, memory, pipe and instruction sections of one
# launch of each main kernel (bench/gpu/profile_kernels.py), where ncu can read the counters;
# the clocks are left alone (--clock-control none).
if [ "${ISSL_GPU_NCU:-0}" = "1" ]; then
  if command -v ncu >/dev/null 2>&1; then
    set +e
    timeout "$(limit 120 5)" ncu --clock-control none --target-processes all \
      --kernel-name regex:'wgmma|linear_ws|tma_score|tc_sketch|tc_score|kron_fused' \
      --launch-count 12 \
      --section SpeedOfLight --section WarpStateStats --section MemoryWorkloadAnalysis \
      --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis \
      --section SchedulerStats --section InstructionStats --print-details all \
      "$PY" bench/gpu/profile_kernels.py > "$OUT/ncu.txt" 2>&1
    stamp "ncu exit $? (log: $OUT/ncu.txt, $(wc -l < "$OUT/ncu.txt") lines)"
    set -e
  else
    stamp "ncu not found"
  fi
fi

# ---- summary (last) -----------------------------------------------------------------------------
{
  echo "== issl_fast CUDA run: $(grep -m1 -o 'NVIDIA[^|]*' "$OUT/env.txt" | head -n 1 | sed 's/ *$//') sm_$ARCH, $(( $(date +%s) - T0 )) s"
  echo "tests: $( [ $tests_ok -eq 1 ] && echo PASSED || echo FAILED ) ($TEST_RCS)"
  { grep -E '[0-9]+ (passed|failed|skipped|errors?|deselected).* in [0-9.]+s' "$OUT/tests.log" \
      || echo "(no pytest summary line in tests.log)"; } | tail -n 4
  if [ -f "$OUT/table.txt" ]; then cat "$OUT/table.txt"; else echo "benchmarks: no table (exit $rc_bench)"; fi
} > "$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"
if [ -z "${ISSL_GPU_BUILD_DIR:-}" ]; then rm -rf "$BUILD_DIR"; fi
if [ $tests_ok -ne 1 ]; then exit 1; fi
exit 0
