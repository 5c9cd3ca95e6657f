#!/usr/bin/env bash
# The GPU checks of issues 9, 10 and 12 in one call of a GPU machine (at most 9 minutes: the parts' limits),
# with that machine's own python3 and CUDA torch; no .venv, no default model (random weights of its shape).
#   bash results/gpu_check.sh [PART ...]    parts: tests gather smollm2 timeline 7b (the default), suite
# (`suite`: the whole test suite, CPU tests included, in a call of its own: at most 9 minutes)
# Each part has its own time limit; what it measured is written as it goes: the results files under
# results/ (bench-<gpu>.json, gather-<gpu>.json, timeline-<gpu>.json/.png), the logs and a copy of the
# results under $OUT (default results/gpu-check).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu-check}
PY=${PY:-python3}
mkdir -p "$OUT"
parts=${*:-tests gather smollm2 timeline 7b}

run() {  # run NAME LIMIT_S COMMAND...: its log in $OUT/NAME.log, its status on the last line
    local name=$1 limit=$2
    shift 2
    echo "== $name: $* (at most ${limit}s)"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "exit status $?" >>"$OUT/$name.log"
    tail -n 4 "$OUT/$name.log"
}

stamp() {  # stamp NAME: the device, torch and the date under NAME's log (its summary line)
    "$PY" -c "import torch, datetime; print(torch.cuda.get_device_name(), 'torch', torch.__version__,
              datetime.date.today())" >>"$OUT/$1.log" 2>&1
}

for part in $parts; do
    case $part in
    suite)      # every test, then the same summary line
        run suite 540 "$PY" -m pytest -q -p no:cacheprovider tests
        stamp suite ;;
    tests)      # every CUDA test, then the summary line with the device, torch and the date
        run tests 150 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests
        stamp tests ;;
    gather)     # host gather + copy against the kernel, GB/s of useful bytes
        run gather 45 "$PY" bench.py --suite gather ;;
    smollm2)    # the SmolLM2 shape, graphs on, then the same rows op by op (their copy waits timed)
        run smollm2 120 "$PY" bench.py --suite gpu --models smollm2 --shapes 32x4096 \
            --policies full,offload,infinigen:0.1,infinigen:0.2,h2o:0.1,hf-dynamic
        run smollm2-no-graphs 45 "$PY" bench.py --suite gpu --models smollm2 --shapes 32x4096 --no-graphs \
            --policies full,infinigen:0.1 ;;
    timeline)   # layer i+1's copy inside layer i's compute, on the Llama-2-7B shape
        run timeline 45 "$PY" bench.py --suite timeline --models 7b --shapes 8x4096 ;;
    7b)         # the Llama-2-7B shape at 8 x 4096
        run 7b 120 "$PY" bench.py --suite gpu --models 7b --shapes 8x4096 \
            --policies full,offload,infinigen:0.1,infinigen:0.2,h2o:0.1,hf-dynamic,hf-offloaded ;;
    *) echo "unknown part $part (tests gather smollm2 timeline 7b suite)"; exit 2 ;;
    esac
    cp results/bench-*.json results/gather-*.json results/timeline-*.json results/timeline-*.png "$OUT"/ \
        2>/dev/null
done
echo "logs and results in $OUT"
