#!/usr/bin/env bash
# The GPU check: one command for a GPU machine lent for a few minutes, with torch and transformers installed and
# no network. From the repository root:
#
#   scripts/gpu_check.sh [--dry-run] [--out DIR]
#
# Steps, each under its own time limit, results written as they come (docs/gpu-check.md):
#   env         DIR/env.txt: date, host, device (nvidia-smi), python / torch / CUDA / transformers versions
#   cuda-tests  DIR/cuda-tests.txt + .xml: `pytest -m cuda` (tests/test_cuda.py: the conformance matrix in bf16 / fp16,
#               FlashAttention-2 when flash_attn imports)
#   bench-a/b/c `vtprune bench` of the LLaVA-1.5-7B architecture (random weights) in bf16, regimes (a) one new token,
#               (b) batch 1 decode, (c) batch 16 decode
#   bench-v     `vtprune bench --video-frames 8,16,32` of the Qwen2.5-VL-7B architecture (random weights) in bf16: one
#               video per prompt, one new token, how each method's saving grows with frames
#               (every regime's tables in DIR/bench.md, their JSON / Markdown / PNG in DIR/bench.tar.gz)
# and DIR/gpu-check.log (each step's time and exit status, the bench's progress lines): 6 files.
#
# --dry-run runs the same steps on the CPU with the bench's `tiny` and `qwen2.5-vl-tiny` architectures (the CUDA tests
# then skip) in about 47 s of CPU time. DIR: --out, else $OUT, else ./gpu-check-out. Needs python3 or python (or $PYTHON) with
# torch, transformers, pillow, numpy and, for the tests, pytest; vtprune runs from src/ (nothing is installed).
# Packages the machine lacks can be put in a folder (pip install --target .gpu-deps pytest) that is added to
# PYTHONPATH ($GPU_CHECK_DEPS, default ./.gpu-deps). Exit status: 0 when every step passed, 1 otherwise.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY=0
DEST="${OUT:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) DEST="${2:?--out needs a folder}"; shift ;;
    --out=*) DEST="${1#--out=}" ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1'; accepted: --dry-run, --out DIR, --help" >&2; exit 2 ;;
  esac
  shift
done
DEST="${DEST:-$ROOT/gpu-check-out}"
mkdir -p "$DEST" || exit 2
DEST="$(cd "$DEST" && pwd)"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then  # the first of python3, python that has torch
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" 2>/dev/null; then
      PY="$(command -v "$candidate")"; break
    fi
  done
  [ -n "$PY" ] || { echo "gpu_check.sh: no python3 or python with torch found; set PYTHON" >&2; exit 2; }
fi
DEPS="${GPU_CHECK_DEPS:-$ROOT/.gpu-deps}"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
[ -d "$DEPS" ] && export PYTHONPATH="$PYTHONPATH:$DEPS"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRANSFORMERS_VERBOSITY=error PYTHONDONTWRITEBYTECODE=1
cd "$ROOT" || exit 2

LOG="$DEST/gpu-check.log"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
rm -f "$DEST/env.txt" "$DEST/cuda-tests.txt" "$DEST/cuda-tests.xml" "$DEST/bench.md" "$DEST/bench.tar.gz"
: >"$LOG"
FAILED=0
START=$SECONDS

log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" | tee -a "$LOG" >&2; }

# run_step NAME LIMIT_S STDOUT STDERR COMMAND...: run COMMAND under `timeout`, its output appended to the files STDOUT
# and STDERR; log the time and the outcome; returns the exit status
run_step() {
  local name=$1 limit=$2 out=$3 err=$4 t0=$SECONDS rc
  shift 4
  log "step $name: start (limit ${limit}s)"
  timeout --kill-after=5 "$limit" "$@" >>"$out" 2>>"$err"
  rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    log "step $name: TIMED OUT after $((SECONDS - t0))s (limit ${limit}s)"
  elif [ $rc -ne 0 ]; then
    log "step $name: FAILED (exit $rc) after $((SECONDS - t0))s"
  else
    log "step $name: ok in $((SECONDS - t0))s"
  fi
  [ $rc -eq 0 ] || FAILED=1
  return $rc
}

skip_step() { log "step $1: SKIPPED: $2"; }

if [ "$DRY" -eq 1 ]; then
  MODE="dry run (CPU, tiny architectures)"
  export CUDA_VISIBLE_DEVICES=""  # the CPU even on a GPU machine: the CUDA tests skip
  unset VTPRUNE_TEST_DEVICE
  # the same steps at test sizes: tiny LLaVA (16 visual tokens, budgets scaled), tiny Qwen2.5-VL (8 visual tokens
  # per frame), one round, small ceilings
  BENCH=(--device cpu --dtype float32 --threads 1 --warmup 0 --repeats 1 --matmul-size 256 --copy-mb 8)
  IMAGE_ARCH=(--arch tiny)
  REGIME_A=(--new-tokens 1 --budgets 12,8,4)
  REGIME_B=(--new-tokens 4 --budgets 8)
  REGIME_C=(--new-tokens 4 --batch 16 --budgets 8)
  REGIME_V=(--arch qwen2.5-vl-tiny --video-frames 2,4 --new-tokens 1 --budgets 25%)
else
  MODE="GPU"
  # LLaVA-1.5-7B in bf16 (576 visual tokens, 13.5 GB of weights) in (a)-(c), Qwen2.5-VL-7B in bf16 (16.6 GB) with one
  # video of 448 px frames (128 visual tokens per frame) in (v). Sized for ~5 minutes on an H100 (the step limits add
  # up to 8; docs/gpu-check.md): a bf16 prefill of ~640 tokens is ~10-15 ms there, a batch-1 decode step ~25-30 ms
  # (generate's host loop), so (a) costs ~0.05 s per generation, (b) ~0.5 s, (c) ~0.85 s; (v) ~0.05 / 0.1 / 0.2 s at
  # 8 / 16 / 32 frames (a 32-frame prefill: ~4.2k tokens, ~70 TFLOP, and ~20 TFLOP in the ViT); each case runs
  # warm-up + rounds + one profiled generation, plus ~20 s to import and build the model.
  BENCH=(--device cuda --dtype bfloat16 --warmup 1)
  IMAGE_ARCH=(--arch llava-1.5-7b)
  REGIME_A=(--new-tokens 1 --budgets 192,128,64 --repeats 3)                # 26 cases x 5 generations: ~25 s
  REGIME_B=(--new-tokens 16 --budgets 128,64 --repeats 3)                   # 18 cases x 5: ~65 s
  REGIME_C=(--new-tokens 16 --batch 16 --budgets 64 --repeats 2)            # 10 cases x 4: ~55 s
  REGIME_V=(--arch qwen2.5-vl-7b --video-frames 8,16,32 --new-tokens 1 --budgets 25% --repeats 2)  # 3 x 10 x 4: ~45 s
fi
METHODS=parvts,st3,fastv,vtw,pdrop,visionzip,pool,random,none
log "gpu_check.sh: $MODE; results in $DEST; python $PY"

# ---------------------------------------------------------------- (c) the environment
log "step env: start"
t0=$SECONDS
{
  echo "date_utc: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(hostname 2>/dev/null || echo unknown)"
  echo "mode: $MODE"
  echo "commit: ${GPU_CHECK_COMMIT:-$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)}"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//') x $(nproc --all 2>/dev/null)"
  echo
  if command -v nvidia-smi >/dev/null 2>&1; then
    timeout 15 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit \
      --format=csv 2>&1
    echo
    timeout 15 nvidia-smi 2>&1
  else
    echo "nvidia-smi: not found"
  fi
  echo
  timeout 30 "$PY" - <<'PYEOF'
import importlib.metadata as md
import platform
import sys

print("python:", sys.version.split()[0], platform.platform())
import torch

print("torch:", torch.__version__, "| cuda (build):", torch.version.cuda, "| cudnn:", torch.backends.cudnn.version())
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"device {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}, "
              f"{p.multi_processor_count} SMs")
for name in ("transformers", "tokenizers", "safetensors", "accelerate", "peft", "flash-attn", "pytest", "pillow",
             "numpy", "matplotlib", "lmms-eval"):
    try:
        print(f"{name}: {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name}: not installed")
PYEOF
} >"$DEST/env.txt" 2>&1
env_rc=$?
[ $env_rc -eq 0 ] || FAILED=1
log "step env: $([ $env_rc -eq 0 ] && echo ok || echo "FAILED (exit $env_rc)") in $((SECONDS - t0))s"

# ---------------------------------------------------------------- (a) pytest -m cuda
mapfile -t CUDA_FILES < <(grep -l "pytest.mark.cuda" tests/test_*.py 2>/dev/null)
if ! "$PY" -c "import pytest, PIL, numpy" 2>>"$LOG"; then
  skip_step cuda-tests "pytest, pillow or numpy does not import (see the line above; put missing packages in $DEPS)"
  FAILED=1
elif [ ${#CUDA_FILES[@]} -eq 0 ]; then
  skip_step cuda-tests "no test file carries the cuda marker"
  FAILED=1
else
  run_step cuda-tests 140 "$DEST/cuda-tests.txt" "$DEST/cuda-tests.txt" "$PY" -m pytest -m cuda "${CUDA_FILES[@]}" \
    -o addopts= -v -rfEs -p no:cacheprovider --durations=10 --junitxml="$DEST/cuda-tests.xml"
  tail -n 1 "$DEST/cuda-tests.txt" | tee -a "$LOG" >&2
fi

# ---------------------------------------------------------------- (b) the bench, regime by regime
if ! "$PY" -c "import PIL" 2>>"$LOG"; then  # vtprune's CLI needs pillow (torch and transformers: env.txt)
  skip_step bench "pillow does not import (see the line above; put it in $DEPS)"
  FAILED=1
else
  for regime in a b c v; do
    case $regime in a) args=("${IMAGE_ARCH[@]}" "${REGIME_A[@]}"); limit=40 ;;
                    b) args=("${IMAGE_ARCH[@]}" "${REGIME_B[@]}"); limit=80 ;;
                    c) args=("${IMAGE_ARCH[@]}" "${REGIME_C[@]}"); limit=70 ;;
                    v) args=("${REGIME_V[@]}"); limit=65 ;; esac
    # stdout is the Markdown the bench also writes; stderr its progress lines
    if run_step "bench-$regime" "$limit" /dev/null "$LOG" "$PY" -m vtprune.cli bench "${BENCH[@]}" --methods "$METHODS" \
         "${args[@]}" --out "$WORK/bench-$regime"; then
      # the video summary over frame counts (bench-video-*) first, then each run's tables
      dir="$WORK/bench-$regime"
      { echo "<!-- regime ($regime) -->"; cat $(ls "$dir"/bench-video-*.md 2>/dev/null) $(ls -v "$dir"/bench-b*.md); echo; } \
        >>"$DEST/bench.md"
      tar -czf "$DEST/bench.tar.gz" -C "$WORK" $(cd "$WORK" && ls -d bench-*)
    fi
  done
fi

log "gpu_check.sh: done in $((SECONDS - START))s; $([ $FAILED -eq 0 ] && echo 'every step passed' || echo 'SOME STEPS FAILED OR WERE SKIPPED')"
exit $FAILED
