#!/usr/bin/env bash
# The GPU checks of issues 9, 10 and 12 in one call of a GPU machine (at most 9.5 minutes: the parts' limits),
# with that machine's own python3 and CUDA torch; no .venv, no default model (random weights of its shape).
#   bash results/gpu_check.sh [PART ...]  parts (default): suite 7b slots gather smollm2 timeline profile
#   tests
# (and by name: `grid`, InfiniGen rows on other gather grids, measured at 83b3924)
# (`suite`: the whole test suite, CPU tests included, first, its tests dealt one by one to PROCS (16)
# processes, at most SUITE_S (240) s; where it was cut short, `BUDGET_S=240 bash results/gpu_check.sh suite`
# again in a second call at once, while the machine is warm: a fresh one would not start on what is left of a
# session's 15 minutes)
# Each part has its own time limit; what it measured is written as it goes: the results files under
# results/ (bench-<gpu>.json, gather-<gpu>.json, timeline-<gpu>.json/.png, profile-<model>-<gpu>.json) and
# the logs under $LOGS.
# All of them are packed into one file, $OUT/gpu-check.tgz (the device tool brings back at most 8 files),
# after every part and every 20 s while one runs, so a call cut short keeps the rows written so far.
# The parts most wanted run first: the whole suite, then the 7B-shape rows after the short gather measurement.
# The whole call keeps within BUDGET_S seconds (570: a 600 s call): a part gets at most what is left of it,
# less 20 s for the report and the last pack; a part with under 15 s left is skipped, and says so.
# First a smoke test: the Triton kernels read and write registered host memory on this GPU (they need a C
# compiler for their launcher). Where they cannot, the benchmark parts use the host gather, and say so.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu-check}
LOGS=${LOGS:-/tmp/gpu-check}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1                    # a part killed at its limit keeps its output
# The machine has 128 GiB, but a virtual machine's memory grows as it is used and /proc/meminfo
# starts far lower: the preflight plans with this many GiB instead (offload.host_available).
export INFINIGEN_HOST_GIB=${INFINIGEN_HOST_GIB:-110}
mkdir -p "$OUT" "$LOGS"
parts=${*:-suite 7b slots gather smollm2 timeline profile tests}
DEADLINE=$((SECONDS + ${BUDGET_S:-570}))

pack() {  # every log and GPU results file so far, into one archive, replaced whole
    cp results/bench-*.json results/gather-*.json results/timeline-*.json results/timeline-*.png \
        results/profile-*.json "$LOGS"/ 2>/dev/null
    rm -f "$LOGS"/*-cpu.json "$LOGS"/*-cpu-*.json "$LOGS"/*-cpu.png      # the CPU files travel with the tree
    local tmp="$OUT/gpu-check.tgz.$BASHPID"                     # its own name: the packer may run beside it
    tar --warning=no-file-changed -czf "$tmp" -C "$LOGS" . 2>/dev/null    # status 1: a log grew meanwhile
    if [ $? -le 1 ]; then mv "$tmp" "$OUT/gpu-check.tgz"; else rm -f "$tmp"; fi
}

run() {  # run NAME LIMIT_S COMMAND...: its log in $LOGS/NAME.log, its status and seconds on the last line
    local name=$1 limit=$2 t0=$SECONDS left=$((DEADLINE - SECONDS - 20))
    shift 2
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 15 ]; then
        echo "== $name: skipped, ${left}s of the call's time left" | tee "$LOGS/$name.log"
        return
    fi
    local cmd="$*"                                              # (a suite's list of tests: its start)
    [ "${#cmd}" -gt 200 ] && cmd="${cmd:0:200}... ($# arguments)"
    echo "== $name: $cmd (at most ${limit}s)"
    timeout -k 10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    echo "exit status $? after $((SECONDS - t0)) s" >>"$LOGS/$name.log"
    tail -n 4 "$LOGS/$name.log"
}

stamp() {  # stamp NAME: the device, torch and the date under NAME's log (its summary line)
    "$PY" -c "import torch, datetime; print(torch.cuda.get_device_name(), 'torch', torch.__version__,
              datetime.date.today())" >>"$LOGS/$1.log" 2>&1
}

{ date; nvidia-smi; nproc; head -n 5 /proc/meminfo; "$PY" -c "import torch, triton, transformers as tf
print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', tf.__version__)"
"$PY" -c "import pytest, hypothesis, matplotlib; print('pytest, hypothesis, matplotlib: there')"
echo "C compilers: $(command -v cc gcc clang | tr '\n' ' ')"
} >"$LOGS/machine.log" 2>&1
GATHER=""                                    # or "--gather host", below
run smoke 60 "$PY" - <<'PY'
import torch
import kernel
import offload
dev = "cuda"
store = offload.host_tensor((64, 2, 2, 2, 8), torch.float16, pin=True)                # (S, B, Hkv, 2, d)
store.copy_(torch.randn(store.shape, dtype=torch.float16))
idx, ok = torch.randint(0, 64, (2, 2, 5)), torch.rand(2, 2, 5) < 0.7                 # (B, Hkv, n)
dst = torch.zeros(5, 2, 2, 2, 8, dtype=torch.float16, device=dev)                    # (n, B, Hkv, 2, d)
want = torch.zeros(dst.shape, dtype=dst.dtype)                                         # on the host
for b, h, j in ok.nonzero().tolist():
    want[j, b, h] = store[idx[b, h, j], b, h]
kernel.gather_rows(store, idx.to(dev), ok.to(dev), dst)
new = torch.ones(1, 2, 2, 2, 8, dtype=torch.float16, device=dev)                       # (T, B, Hkv, 2, d)
kernel.put_rows(new, torch.tensor([3], device=dev), store)                              # into slot 3
torch.cuda.synchronize()
assert torch.equal(dst.cpu(), want) and bool((store[3] == 1).all()), "the kernels moved the wrong rows"
print("the Triton kernels read and write registered host memory: the device gather runs")
PY
if ! grep -q "the device gather runs" "$LOGS/smoke.log"; then
    GATHER="--gather host"
    echo "the device gather cannot run here (smoke.log): the benchmark parts use --gather host" |
        tee -a "$LOGS/smoke.log"
fi
pack
( while sleep 20; do pack; done ) >/dev/null 2>&1 &  # a call killed mid-part keeps what that part wrote
packer=$!
trap 'kill $packer 2>/dev/null' EXIT
for part in $parts; do
    case $part in
    suite)      # every test, dealt one by one to $PROCS processes (16 cores): no file's length decides
        rm -f "$LOGS"/suite-ids* "$LOGS"/suite-*.log           # (a second call on a warm machine: anew)
        timeout 90 "$PY" -m pytest --collect-only -q -p no:cacheprovider tests 2>&1 |
            tee "$LOGS/suite-collect.log" | grep -E "^tests/test_[a-z0-9_]+\.py::" >"$LOGS/suite-ids"
        if [ -s "$LOGS/suite-ids" ]; then                      # a file that failed to import: run whole,
            grep -oE "^ERROR tests/test_[a-z0-9_]+\.py" "$LOGS/suite-collect.log" | cut -c7- \
                >>"$LOGS/suite-ids"                            # so its error shows in a process's log
        else ls tests/test_*.py >"$LOGS/suite-ids"; fi          # nothing collected: whole files
        procs=${PROCS:-16} n=$(wc -l <"$LOGS/suite-ids")
        [ "$n" -lt "$procs" ] && procs=$n
        awk -v p="$procs" -v to="$LOGS/suite-ids-" '{ print > (to ((NR - 1) % p)) }' "$LOGS/suite-ids"
        pids=()
        for ((k = 0; k < procs; k++)); do
            mapfile -t ids <"$LOGS/suite-ids-$k"               # (test ids may hold spaces: one per line)
            OMP_NUM_THREADS=$(((16 + procs - 1) / procs)) run suite-$k "${SUITE_S:-240}" "$PY" -m pytest \
                -v -rfE --tb=short -p no:cacheprovider --continue-on-collection-errors "${ids[@]}" &
            pids+=($!)
        done
        wait "${pids[@]}"                                      # (not the packer)
        grep -h -E "^(=+ )?[0-9]+ (passed|failed|errors?)|^exit status" "$LOGS"/suite-[0-9]*.log \
            >"$LOGS/suite.log"                                 # then the files that failed to import:
        grep -E "^ERROR " "$LOGS/suite-collect.log" | sed 's/^/collect: /' >>"$LOGS/suite.log"
        stamp suite ;;
    tests)      # every CUDA test, then the summary line with the device, torch and the date (last: the rest)
        run tests 300 "$PY" -m pytest -v -rfE --tb=short -m cuda -p no:cacheprovider \
            --continue-on-collection-errors --durations=10 tests
        stamp tests ;;
    gather)     # host gather + copy against the kernel, GB/s of useful bytes
        run gather 70 "$PY" bench.py $GATHER --suite gather ;;
    smollm2)    # the SmolLM2 shape, graphs on, then the same rows op by op (their copy waits timed)
        run smollm2 100 "$PY" bench.py $GATHER --suite gpu --models smollm2 --shapes 32x4096 \
            --policies full,offload,infinigen:0.1,infinigen:0.2,h2o:0.1,hf-dynamic
        run smollm2-no-graphs 40 "$PY" bench.py $GATHER --suite gpu --models smollm2 --shapes 32x4096 \
            --no-graphs \
            --policies full,infinigen:0.1 ;;
    timeline)   # layer i+1's copy inside layer i's compute, on the Llama-2-7B shape
        run timeline 80 "$PY" bench.py $GATHER --suite timeline --models 7b --shapes 8x4096 ;;
    profile)    # where a decode step's device time goes, kernel by kernel (op by op, one step)
        run profile-smollm2 40 "$PY" bench.py $GATHER --suite profile --models smollm2 --shapes 32x4096 \
            --policies full,offload,infinigen:0.1
        run profile-7b 50 "$PY" bench.py $GATHER --suite profile --models 7b --shapes 8x4096 \
            --policies infinigen:0.1 ;;
    grid)       # rows again on the old gather grid (a program per block of rows), then on a smaller one
        if [ -n "$GATHER" ]; then
            echo "== grid: skipped, no device gather here" | tee "$LOGS/grid.log"
            continue
        fi
        run grid-7b 60 "$PY" bench.py $GATHER --suite gpu --models 7b --shapes 8x4096 --gather-per-sm 0 \
            --policies infinigen:0.1,infinigen:0.2
        run grid-smollm2 40 "$PY" bench.py $GATHER --suite gpu --models smollm2 --shapes 32x4096 \
            --gather-per-sm 0 --policies infinigen:0.1
        run grid-7b-one-per-sm 45 "$PY" bench.py $GATHER --suite gpu --models 7b --shapes 8x4096 \
            --gather-per-sm 1 --policies infinigen:0.1 ;;          # one program per SM
    slots)      # InfiniGen's top-k selection as one Triton kernel (--slots kernel), and its speculation too
                # (--slots fused), against torch's operations (the default), in one call
        for m in "smollm2 32x4096 torch kernel fused" "7b 8x4096 torch fused"; do
            set -- $m
            s=40; [ "$1" = 7b ] && s=50          # a 7B row starts slower (its random weights)
            for how in "${@:3}"; do
                run slots-$1-$how $s "$PY" bench.py $GATHER --suite gpu --models $1 --shapes $2 --slots $how \
                    --policies infinigen:0.1
            done
        done
        run profile-slots 40 "$PY" bench.py $GATHER --suite profile --models smollm2 --shapes 32x4096 \
            --policies infinigen:0.1 --slots fused --out results/profile-smollm2-slots-fused.json ;;
    7b)         # the Llama-2-7B shape at 8 x 4096
        run 7b 150 "$PY" bench.py $GATHER --suite gpu --models 7b --shapes 8x4096 \
            --policies full,offload,infinigen:0.1,infinigen:0.2,h2o:0.1,hf-dynamic,hf-offloaded ;;
    *) echo "unknown part $part (suite 7b slots gather smollm2 timeline profile tests grid)"; exit 2 ;;
    esac
    pack
done
for f in results/bench-*.json; do    # the README's table and issue 10's targets, from what was measured
    [ -e "$f" ] || continue          # none written: no report (the glob would stay as it is)
    case $f in *-cpu.json) ;; *) "$PY" bench.py --suite report --results "$f" >"$LOGS/report.md" 2>&1 ;; esac
done
kill $packer 2>/dev/null; wait $packer 2>/dev/null
rm -f "$OUT"/gpu-check.tgz.*                                    # what a killed packer left half-written
pack
echo "logs and results in $OUT/gpu-check.tgz (unpacked: $LOGS)"
