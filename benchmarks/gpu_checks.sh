#!/usr/bin/env bash
# The README's GPU rows in one run on one CUDA GPU (README, Speed -> On a GPU; Results -> the gpu preset):
#
#   1. tests/test_device.py on CUDA: every stage with --device cuda, every module forward on the GPU;
#   2. bench_step.py at ImageNet shape (4x32x32 latents, patch 2), bf16, eager: B/2 at batch 256, XL/2 at 128;
#   3. bench_train.py on the glyph image level (depth 3, level 1), bf16: S and B at batch 256;
#   4. reproduce.py --preset gpu --defer-fid: trains and samples (score the samples later with --finish);
#   5. bench_step.py compiled (torch.compile): B/2, then XL/2.
#
# Each step runs under its own time limit inside one overall budget (a step the budget cannot hold is skipped, and
# says so); each writes OUTDIR/<step>.txt. If bench_train's S loop is too slow for the gpu preset's 3,000 steps a
# level in its share of the budget, the preset runs with fewer (--steps, named in its results).
#
#   bash benchmarks/gpu_checks.sh OUTDIR [SECONDS]      # default 570 s: under 10 minutes on an H200
set -u
out=${1:?usage: bash benchmarks/gpu_checks.sh OUTDIR [SECONDS]}
end=$((SECONDS + ${2:-570}))
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

step() {  # NAME LIMIT_S COMMAND...: run COMMAND for at most LIMIT_S seconds (less if the budget ends first)
    local name=$1 limit=$2 left=$((end - SECONDS)) start=$SECONDS
    shift 2
    if ((left < 30)); then echo "skipped $name: the budget is spent" | tee "$out/$name.txt"; return 1; fi
    ((limit > left)) && limit=$left
    echo "=== $name (at most ${limit} s): $*"
    timeout -k 5 "$limit" "$@" >"$out/$name.txt" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$out/$name.txt"
    grep -E "passed|failed|error|Error|machine:|model:|step:|utilisation|steps/s|end-to-end|FID|wall" "$out/$name.txt" | tail -n 12
    return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, torch.version.cuda)" | tee -a "$out/gpu.txt"

step device-test 90 python -m pytest -q -p no:cacheprovider tests/test_device.py -k cuda -rs
for size in B XL; do
    batch=$([ $size = XL ] && echo 128 || echo 256)
    step step-$size-eager 60 python benchmarks/bench_step.py --size $size --batch $batch --device cuda --precision bf16 \
        --steps 10 --warmup 3
done
for size in S B; do
    step train-$size 75 python benchmarks/bench_train.py --level 1 --depth 3 --model $size --batch 256 --device cuda \
        --precision bf16 --repeats 3
done

# the gpu preset: 5 levels of 3,000 steps (3 image-sized, 2 small); fewer if the S loop above says they would not fit
rate=$(sed -n 's/^train.py loop: \([0-9.]*\) steps\/s.*/\1/p' "$out/train-S.txt" 2>/dev/null)
budget=$((end - SECONDS - 100))  # 100 s left for the compiled benchmarks
((budget > 300)) && budget=300
steps=$(python -c "r = float('${rate:-0}' or 0); print(min(3000, int(max(r * ($budget - 90) / 5, 0)) // 100 * 100) if r else 1500)")
flags=$([ "$steps" = 3000 ] && echo "" || echo "--steps $steps")
echo "gpu preset: S loop ${rate:-unknown} steps/s, ${budget} s -> ${steps} steps a level"
((steps >= 500)) && step gpu-preset "$budget" python reproduce.py --preset gpu --defer-fid $flags

for size in B XL; do
    batch=$([ $size = XL ] && echo 128 || echo 256)
    step step-$size-compiled 200 python benchmarks/bench_step.py --size $size --batch $batch --device cuda \
        --precision bf16 --compile --steps 10 --warmup 3
done
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv >>"$out/gpu.txt"
