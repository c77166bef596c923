#!/usr/bin/env bash
# GPU measurements, one device call per line below (each well under a call's 10 minutes).
# Run on the GPU machine from the repository root, after installing the wheels it lacks
# (grpcio and friends, protobuf, gguf, prometheus_client; see the device tool's README):
#
#   bash benchmarks/gpu_pending.sh fused-kernel         # nvidia-h200 (~8 min; done 2026-12-01)
#   bash benchmarks/gpu_pending.sh tests                # nvidia-h200 (~2 min)
#   bash benchmarks/gpu_pending.sh fused-engine         # nvidia-h200 (~5 min; done 2026-12-01)
#   bash benchmarks/gpu_pending.sh adapters             # nvidia-h200 (~6 min; done 2026-12-01)
#   bash benchmarks/gpu_pending.sh graphs remat         # nvidia-h200 (~4 min; done 2026-12-01)
#   bash benchmarks/gpu_pending.sh tp                   # nvidia-h200-x2 (~6 min)
#   bash benchmarks/gpu_pending.sh train server         # nvidia-h200 (~5 min; done 2026-12-01)
#
#   bash benchmarks/gpu_pending.sh profile              # nvidia-h200 (~1 min; done 2026-12-02)
#   bash benchmarks/gpu_pending.sh sweep                # nvidia-h200 (~6 min; done 2026-12-02)
#   bash benchmarks/gpu_pending.sh gemm-kernel          # nvidia-h200 (~4 min; done 2026-12-02)
#   bash benchmarks/gpu_pending.sh gemm-engine          # nvidia-h200 (~6 min; done 2026-12-02)
#   bash benchmarks/gpu_pending.sh gemm-default         # nvidia-h200 (~9 min; done 2026-12-02)
#   bash benchmarks/gpu_pending.sh page-write           # nvidia-h200 (~6 min; done 2026-12-04)
#   bash benchmarks/gpu_pending.sh warm-reps            # nvidia-h200 (~2 min; done 2026-12-04
#                                                       #  for base and distinct)
#
# Still owed (2026-12-04): tp (issue 5, two GPUs; that kind was not lent), identical timed
# with the warm-up, and a sweep (batches 1-256) with the gemm default and the warm-up. The trace (profile), the sweep with the glue-free
# LoRA kernels and the gemm path in the step are in RESULTS.md.
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
        run gpu-tests 150 env JAX_PLATFORMS=cuda $py -m pytest -q -rs -m gpu tests ;;
    kernels)   # every paged attention and LoRA kernel test, compiled for the GPU
        run kernel-tests 240 env JAX_PLATFORMS=cuda $py -m pytest -q \
            tests/pallas_kernels/test_paged_attention.py tests/pallas_kernels/test_lora.py \
            -k "not lowers" ;;
    fused-kernel)  # issue 5: the fused per-token LoRA kernel compiled for the GPU, then
                   # llama2-7b's four projection groups, split pair vs one launch vs XLA
        run fused-tests 150 env JAX_PLATFORMS=cuda $py -m pytest -q \
            tests/pallas_kernels/test_lora.py -k "fused and not lowers"
        run bench-apply 360 $py -m benchmarks.bench_lora_kernels --ranks 16 --tokens \
            --apply 1 8 32 64 256 --reps 15 ;;
    fused-engine)  # issue 5, acceptance 4: the decode step with either LoRA kernel
        run engine-fused 400 $py -m benchmarks.bench_engine --batch 32 \
            --workloads base distinct identical --lora-kernel split fused --steps 30 ;;
    adapters)  # issue 7, acceptance 3: working set 8-512 over 32 slots
        run bench-adapters 400 $py -m benchmarks.bench_adapters --model llama2-7b \
            --working-set 8 32 128 512 --slots 32 --rank 16 --rate 8 --requests 200 \
            --gaps-out "$out/adapter-gaps.json" ;;
    train)     # issue 6, acceptance 5
        run bench-train 400 $py -m benchmarks.bench_train --model smollm2-135m llama3-8b \
            --rank 16 --batch 8 --seq-len 512 ;;
    remat)     # issue 6: gradient checkpointing's memory and speed (its own process: device
               # peak memory is a process-wide maximum)
        run bench-train-remat 200 $py -m benchmarks.bench_train --model llama3-8b --rank 16 \
            --batch 8 --seq-len 512 --remat ;;
    server)    # issue 8, acceptance 5: gRPC vs in-process, batch-32 Distinct
        run bench-server 300 $py -m benchmarks.bench_server --model llama2-7b ;;
    graphs)    # issue 5: is LoRA's ~11 us per shrink/expand pair launch cost? The batch-32
               # step as XLA builds it, then with command buffers (CUDA graphs) off, then with
               # every sequence of 1+ kernels in one
        for variant in default:"" no-graphs:--xla_gpu_enable_command_buffer= \
                       graph-all:--xla_gpu_graph_min_graph_size=1; do
            run "engine-b32-${variant%%:*}" 150 env XLA_FLAGS="${variant#*:}" $py -m \
                benchmarks.bench_engine --batch 32 --workloads base identical distinct --steps 30
        done ;;
    profile)   # issue 5: where the batch-32 step's time goes, kernel by kernel (torch's CUPTI
               # profiler), with the compiled HLO of each program in $out/prof
        run engine-profile 300 $py -m benchmarks.bench_engine --batch 32 \
            --workloads base identical distinct --steps 30 --profile "$out/prof" ;;
    gemm-kernel)   # issue 5: the base matmul in Pallas with the adapters' term in the same
                   # launch (its tests compiled for the GPU, then llama2-7b's groups at
                   # batch 32 against XLA's matmul + the split kernels)
        run gemm-tests 200 env JAX_PLATFORMS=cuda $py -m pytest -q \
            tests/pallas_kernels/test_lora.py -k "gemm and (bf16 or split) and not lowers"
        run bench-project 240 $py -m benchmarks.bench_lora_kernels --ranks --tokens \
            --project 32 --apply-cases distinct identical --groups qkv o down --reps 10 ;;
    gemm-engine)   # issue 5, acceptance 4: the batch-32 step with the gemm LoRA kernel
        run engine-gemm 400 $py -m benchmarks.bench_engine --batch 32 \
            --workloads base distinct identical --lora-kernel split gemm --steps 30 ;;
    gemm-default)  # issue 5: the gemm path on q/k/v and down only (the default) against the
                   # split pair and against every group on the gemm path, batches 1-64, and
                   # the engine's GPU test with it
        run engine-gemm-test 240 env JAX_PLATFORMS=cuda $py -m pytest -q -rs -m gpu \
            tests/serving/test_engine_gpu.py -k gemm
        run engine-gemm-groups 345 $py -m benchmarks.bench_engine --batch 32 \
            --workloads base distinct identical --lora-kernel split gemm \
            --lora-blocks default gemm_groups=qkv+o+gate_up+down --steps 30
        run engine-gemm-small 400 $py -m benchmarks.bench_engine --batch 8 1 \
            --workloads distinct identical --lora-kernel split gemm --steps 30
        run engine-gemm-64 250 $py -m benchmarks.bench_engine --batch 64 \
            --workloads distinct identical --lora-kernel split gemm --steps 20 \
            --lora-blocks gemm_max_tokens=64 ;;   # 64 tokens take the split pair by default
    page-write)  # issue 5: K and V written by one kernel (the step's trace shows it), and
                 # the gpu-marked tests with it
        run engine-page-write 150 $py -m benchmarks.bench_engine --batch 32 \
            --workloads base distinct --steps 30 --profile "$out/prof"
        run gpu-tests-all 400 env JAX_PLATFORMS=cuda $py -m pytest -q -rs -m gpu tests ;;
    warm-reps)   # issue 5: batch 32 timed twice in one process, each point after the
                 # one-second warm-up (the two repetitions should agree)
        run engine-warm-reps 200 $py -m benchmarks.bench_engine --batch 32 32 \
            --workloads base distinct identical --steps 30 ;;
    sweep)     # issue 5, acceptance 3: the decode sweep by batch and adapter mix
        run engine-sweep 560 $py -m benchmarks.bench_engine --batch 1 8 32 64 128 256 \
            --steps 30 ;;
    tp)        # issue 5, acceptance 5: where the two-GPU engine crashed, then the comparison
        run diagnose-tp 300 $py -m benchmarks.diagnose_tp --tp 2
        run tp-compare 280 $py -m benchmarks.bench_engine --batch --tp-compare 2 ;;
    *)
        echo "unknown section $section (tests kernels fused-kernel fused-engine adapters train" \
             "server remat graphs profile gemm-kernel gemm-engine gemm-default page-write warm-reps sweep tp)" >&2 ;;
    esac
done
