#!/usr/bin/env bash
# The one device check for a GPU machine (no internet): run from the repository root,
#   bash benchmarks/device_check.sh
# ~8 minutes in all; every step has its own timeout, so one hang cannot eat the budget, and a
# failing step does not stop the others. Output: $OUT/device_check.log when $OUT is set (the
# device tool returns files under $OUT), else stdout; paste it into an issue note.
# Python: .venv/bin/python (carry the .venv; torch in it must be a CUDA build), else $PYTHON or
# python3. Nothing is installed from the network.
set -u
cd "$(dirname "$0")/.."

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    LOG="$OUT/device_check.log"
    exec > >(tee "$LOG") 2>&1
fi
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
JSON_DIR="${OUT:-$(mktemp -d)}"
SUMMARY=()

step() {  # step NAME SECONDS COMMAND...: run with a timeout, log its status and wall time
    local name="$1" secs="$2"
    shift 2
    echo
    echo "=== [$name] (timeout ${secs}s): $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$secs" "$@"
    local rc=$?
    local status="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="TIMEOUT"; elif [ "$rc" -ne 0 ]; then status="FAILED rc=$rc"; fi
    echo "=== [$name] $status in $((SECONDS - t0))s"
    SUMMARY+=("$name: $status ($((SECONDS - t0))s)")
}

echo "=== MedTranslate device check, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(hostname)"
echo "=== tree: $(git rev-parse HEAD 2>/dev/null || echo "no git here")"
if command -v nvidia-smi >/dev/null 2>&1; then
    step nvidia-smi 30 nvidia-smi
else
    echo "=== nvidia-smi: not found"
fi
step versions 60 "$PY" -c '
import platform, sys
import torch
print("python", sys.version.split()[0], platform.platform())
print("torch", torch.__version__, "cuda build", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
ok = torch.cuda.is_available()
print("torch.cuda.is_available():", ok)
if ok:
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i} {p.name} {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}, "
              f"bf16 {torch.cuda.is_bf16_supported()}")
    print("cudnn.allow_tf32", torch.backends.cudnn.allow_tf32, "matmul.allow_tf32",
          torch.backends.cuda.matmul.allow_tf32)
'
if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    CUDA=1
    echo "=== CUDA available: running the GPU tests and benchmarks on cuda"
else
    CUDA=0
    echo "=== NO CUDA: torch.cuda.is_available() is False (a CPU-only torch build or no GPU);"
    echo "=== the GPU tests will be skipped and the CUDA benchmarks are left out"
fi

# the GPU tests (skipped with the reason without CUDA); -rA prints what each one measured
step gpu-tests 200 "$PY" -m pytest -q -rA -p no:cacheprovider -m gpu Testing/test_gpu.py \
    --junitxml="$JSON_DIR/gpu_tests.xml"
# CPU-independent tests that touch device / precision / batch handling (cuda paths where available)
step engine-device-tests 45 "$PY" -m pytest -q -p no:cacheprovider Testing/test_engine.py \
    -k "device or precision or oom or out_of_memory or batch"

if [ "$CUDA" = 1 ]; then
    # the engine at real batch sizes on the demo bundles' networks, fp32 and bf16
    step engine-bench-fp32 50 "$PY" benchmarks/benchmark_engine.py --device cuda --precision fp32 \
        --arch demo --methods pix2pix resshift dgpg c2fmit --sizes 128 256 --batch-size 32 --slices 64 --steps 10 \
        --json "$JSON_DIR/bench_engine_fp32.json"
    step engine-bench-bf16-auto 50 "$PY" benchmarks/benchmark_engine.py --device cuda --precision bf16 \
        --arch demo --methods pix2pix resshift dgpg c2fmit --sizes 128 256 --batch-size auto --slices 64 --steps 10 \
        --json "$JSON_DIR/bench_engine_bf16.json"
    # one paper-size network per paper config: forward / sampling timing
    for m in c2fmit rlbcd dfbk; do
        if [ -f benchmarks/benchmark_paper_methods.py ]; then
            extra=()
            if [ "$m" != dfbk ]; then extra=(--steps 10); fi
            step "paper-$m" 35 "$PY" benchmarks/benchmark_paper_methods.py --method "$m" --size paper \
                --device cuda --repeats 1 "${extra[@]}"
        else
            step "paper-$m" 35 "$PY" benchmarks/benchmark_engine.py --device cuda --methods "$m" \
                --arch "training/configs/$m.yaml" --sizes 256 --batch-size 8 --slices 16 --steps 10
        fi
    done
    step paper-dgpg 35 "$PY" benchmarks/benchmark_engine.py --device cuda --methods dgpg \
        --arch training/configs/dgpg.yaml --sizes 256 --batch-size 8 --slices 16
fi

echo
echo "=== summary (python: $PY, cuda: $CUDA, ${SECONDS}s in all)"
for line in "${SUMMARY[@]}"; do echo "  $line"; done
