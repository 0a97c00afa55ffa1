#!/usr/bin/env bash
# The README's GPU rows in one run on one CUDA GPU (README, Speed -> On a GPU; Results -> the gpu preset):
#
#   device-test   tests/test_device.py on CUDA: every stage with --device cuda, every module forward on the GPU;
#   step-eager    bench_step.py at ImageNet shape (4x32x32 latents, patch 2), bf16: B/2 at batch 256, XL/2 at 128;
#   train         bench_train.py on the glyph image level (depth 3, level 1), bf16: S and B at batch 256;
#   gpu-preset    reproduce.py --preset gpu --defer-fid: trains and samples (score the samples later with --finish);
#   step-compiled bench_step.py with torch.compile: B/2, then XL/2.
#
# Each step runs under its own time limit inside one overall budget (a step the budget cannot hold is skipped, and
# says so; a gpu preset cut short keeps its finished levels, and the next run of it resumes); each writes
# OUTDIR/<step>.txt. Name steps to run only those, in that order.
#
#   bash benchmarks/gpu_checks.sh OUTDIR [SECONDS [STEP ...]]   # default: 570 s, every step (under 10 min on an H200)
#   bash benchmarks/gpu_checks.sh OUTDIR 570 gpu-preset          # the preset alone
set -u
out=${1:?usage: bash benchmarks/gpu_checks.sh OUTDIR [SECONDS [STEP ...]]}
end=$((SECONDS + ${2:-570}))
shift $(($# < 2 ? $# : 2))
steps=${*:-device-test step-eager train gpu-preset step-compiled}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

run() {  # NAME LIMIT_S COMMAND...: run COMMAND for at most LIMIT_S seconds (less if the budget ends first)
    local name=$1 limit=$2 left=$((end - SECONDS)) start=$SECONDS
    shift 2
    if ((left < 30)); then echo "skipped $name: the budget is spent" | tee "$out/$name.txt"; return 1; fi
    ((limit > left)) && limit=$left
    echo "=== $name (at most ${limit} s): $*"
    timeout -k 5 "$limit" "$@" >"$out/$name.txt" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$out/$name.txt"
    grep -E "passed|failed|Error|machine:|model:|step:|utilisation|steps/s|end-to-end|FID|wall" "$out/$name.txt" | tail -n 12
    return $rc
}

bench_step() {  # eager|compiled
    for size in B XL; do
        batch=$([ $size = XL ] && echo 128 || echo 256)
        run step-$size-$1 $([ "$1" = eager ] && echo 60 || echo 200) python benchmarks/bench_step.py --size $size \
            --batch $batch --device cuda --precision bf16 --steps 10 --warmup 3 $([ "$1" = eager ] || echo --compile)
    done
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, torch.version.cuda)" | tee -a "$out/gpu.txt"
for step in $steps; do
    case $step in
        device-test) run device-test 90 python -m pytest -q -p no:cacheprovider tests/test_device.py -k "cuda or svd" -rs ;;
        step-eager) bench_step eager ;;
        train) for size in S B; do
                   run train-$size 75 python benchmarks/bench_train.py --level 1 --depth 3 --model $size --batch 256 \
                       --device cuda --precision bf16 --repeats 3
               done ;;
        gpu-preset) run gpu-preset 100000 python reproduce.py --preset gpu --defer-fid ;;
        step-compiled) bench_step compiled ;;
        *) echo "unknown step $step (device-test, step-eager, train, gpu-preset, step-compiled)"; exit 2 ;;
    esac
done
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv >>"$out/gpu.txt"
