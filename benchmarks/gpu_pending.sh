#!/usr/bin/env bash
# The GPU measurements still owed, for one device call each group (each well under the
# 10-minute limit of a call). Run on the GPU machine from the repository root:
#
#   bash benchmarks/gpu_pending.sh tests adapters       # nvidia-h200, call 1 (~6 min)
#   bash benchmarks/gpu_pending.sh train server         # nvidia-h200, call 2 (~8 min)
#   bash benchmarks/gpu_pending.sh tp                   # nvidia-h200-x2, call 3 (~6 min)
#
# Each section writes its full log to $OUT/<section>.log (the device tool returns $OUT) and
# prints its last lines; a section that fails or times out does not stop the others.
set -uo pipefail
out=${OUT:-/tmp/jlora-gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}   # the GPU machine's python3 is the one with jax[cuda]

run() {   # run NAME SECONDS COMMAND...: log to $out/NAME.log, show the tail
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $*"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "=== $name: exit $?"
    tail -n 12 "$out/$name.log"
}

for section in "$@"; do
    case $section in
    tests)     # the gpu-marked tests: kernels compiled for the GPU, and the engine with them
        run gpu-tests 150 $py -m pytest -q -m gpu tests ;;
    kernels)   # every paged attention and LoRA kernel test, compiled for the GPU
        run kernel-tests 240 env JAX_PLATFORMS=cuda $py -m pytest -q \
            tests/pallas_kernels/test_paged_attention.py tests/pallas_kernels/test_lora.py \
            -k "not lowers" ;;
    adapters)  # issue 7, acceptance 3: working set 8-512 over 32 slots
        run bench-adapters 400 $py -m benchmarks.bench_adapters --model llama2-7b \
            --working-set 8 32 128 512 --slots 32 --rank 16 --rate 8 --requests 200 ;;
    train)     # issue 6, acceptance 5
        run bench-train 400 $py -m benchmarks.bench_train --model smollm2-135m llama3-8b \
            --rank 16 --batch 8 --seq-len 512 ;;
    server)    # issue 8, acceptance 5: gRPC vs in-process, batch-32 Distinct
        run bench-server 300 $py -m benchmarks.bench_server --model llama2-7b ;;
    tp)        # issue 5, acceptance 5: where the two-GPU engine crashed, then the comparison
        run diagnose-tp 300 $py -m benchmarks.diagnose_tp --tp 2
        run tp-compare 280 $py -m benchmarks.bench_engine --batch --tp-compare 2 ;;
    *)
        echo "unknown section $section (tests kernels adapters train server tp)" >&2 ;;
    esac
done
