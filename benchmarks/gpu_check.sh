#!/usr/bin/env bash
# One-shot GPU check of the Triton kernels (ops/triton): CUDA correctness tests, then the benchmark.
#   OUT=/some/dir bash benchmarks/gpu_check.sh
# Needs only python3 with torch + triton (+ pytest for stage 1); never imports megatron. Every stage is
# wrapped (a failure is logged and the next stage runs); a global cap (GPU_CHECK_CAP, default 480 s) bounds
# the whole script; everything lands under $OUT as it is produced (summary.txt last).
#   GPU_CHECK_QUICK=1: ~2.5 min total — stage 1 only the mHC, attention and Newton-Schulz tests (60 s cap),
#   stage 2 attention hd512 (window, range, top-k at 4K, 16K), mHC (4K, 16K) and NS (~70 s budget).
# Stage 1 no longer stops at the first failure (--maxfail=20): every test file runs.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
QUICK="${GPU_CHECK_QUICK:-0}"
if [ "$QUICK" = "1" ]; then CAP="${GPU_CHECK_CAP:-150}"; else CAP="${GPU_CHECK_CAP:-480}"; fi
START=$(date +%s)
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_CACHE_DIR=/tmp/v4_triton_cache
unset TRITON_INTERPRET
export OMP_NUM_THREADS=4
left() { echo $(( CAP - ($(date +%s) - START) )); }
log() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/summary.txt"; }

log "start; cap ${CAP}s; out $OUT"
{ nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv 2>&1;
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())" 2>&1;
  $PY -c "import ops, sys; print('ops imports megatron:', any(m.startswith('megatron') for m in sys.modules))" 2>&1
} | tee "$OUT/env.txt"

# Stage 1: correctness tests of the kernels, compiled on CUDA (same test files CI runs in the interpreter).
if [ "$QUICK" = "1" ]; then
  T1MAX="${GPU_CHECK_T1:-60}"
  TESTS="tests/test_triton_mhc.py tests/test_triton_attention.py tests/test_triton_newton_schulz.py"
else
  T1MAX="${GPU_CHECK_T1:-200}"
  # the compile-only sm_90 check (test_triton_sm90_compile.py) is for GPU-less machines: skipped here
  TESTS=$(ls tests/test_triton_*.py | grep -v sm90_compile)
fi
T1=$(( $(left) < T1MAX ? $(left) : T1MAX ))
log "stage 1: pytest $TESTS on CUDA (timeout ${T1}s)"
timeout -k 10 "$T1" $PY -m pytest -q -p no:cacheprovider -o addopts="" --noconftest --maxfail=20 --tb=short \
    --durations=15 --junitxml="$OUT/pytest.xml" $TESTS > "$OUT/pytest.log" 2>&1
RC1=$?
tail -n 25 "$OUT/pytest.log" | tee -a "$OUT/summary.txt"
log "stage 1 rc=$RC1"

# Stage 2: benchmark (own budget = what is left minus a margin); writes $OUT/bench.json as it goes.
# Order: attention hd512 (window, range, top-k), mHC, NS at 4K and 16K first, then 64K/128K, then the rest.
if [ "$QUICK" = "1" ]; then
  B=$(( $(left) - 10 )); B=$(( B < 70 ? B : 70 ))
  BARGS="--only attn,mhc,ns --tokens 4096,16384"
else
  B=$(( $(left) - 20 ))
  BARGS="--only attn,mhc,ns,sdpa,attn128,compressor,indexer --tokens 4096,16384,65536,131072"
fi
if [ "$B" -gt 20 ]; then
  log "stage 2: benchmarks/bench_kernels.py $BARGS (budget ${B}s)"
  timeout -k 10 $(( B + 15 )) $PY benchmarks/bench_kernels.py --out "$OUT" --budget "$B" $BARGS > "$OUT/bench.log" 2>&1
  RC2=$?
  log "stage 2 rc=$RC2"
  # the table printed at the end (or the last records if the run was cut)
  grep -A 80 "^======" "$OUT/bench.log" | tee -a "$OUT/summary.txt" || tail -n 40 "$OUT/bench.log" | tee -a "$OUT/summary.txt"
else
  log "stage 2 skipped: no time left"
fi
log "done"
tail -n 60 "$OUT/summary.txt" >/dev/null
