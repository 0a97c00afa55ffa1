"""Training-step throughput of the denoiser (denoiser.py, DiT §3.2) against this machine's matmul peak.

One step = forward + eps-MSE loss (paper Eq. 3) + backward + AdamW, on the image level of the paper
layout (SD-VAE latent 4x32x32, patch 2 -> 256 tokens), in fp32 or under bf16 autocast (fp32 master weights,
as train.py --precision bf16), eager or torch.compile'd. Training FLOPs are counted as 3x the forward
FLOPs from torch's FlopCounterMode (real FLOPs: 2 per multiply-add). Utilisation = achieved FLOP/s over the
FLOP/s of a square matmul in the step's precision (best of 5; --matmul, default 2048^3 on the CPU and
8192^3 on a GPU) measured right after each step, so that both see the same load on a shared machine; the
median over the steps is reported. On a shared 2-core machine --threads 1 avoids OpenMP oversubscription stalls.

    python benchmarks/bench_step.py --size S --batch 16 --steps 5 [--threads 1]
    python benchmarks/bench_step.py --size XL --batch 128 --device cuda --precision bf16 --compile --steps 10 --warmup 3
"""
import argparse
import os
import sys
import time

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import UsageError, machine, run_main  # noqa: E402
from denoiser import SIZES, Denoiser, count_params, flop_counter  # noqa: E402
from diffusion import Diffusion  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(device, n, dtype, reps=5) -> float:
    """Best-of-`reps` FLOP/s of an n x n x n matmul in ``dtype`` (2 n^3 FLOPs)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b  # warm-up
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def main(args):
    if args.batch < 1 or args.steps < 1 or args.matmul < 0:
        raise UsageError("--batch and --steps must be >= 1, --matmul >= 0")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    n = args.matmul or (8192 if device.type == "cuda" else 2048)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = (4, 32, 32)  # paper image level: SD-VAE latent, patch 2 -> 256 tokens
    model = Denoiser(shape, 2, size=args.size).to(device).train()
    diffusion = Diffusion()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.03, betas=(0.99, 0.99),
                            fused=device.type in ("cpu", "cuda"))
    x0 = torch.randn(args.batch, *shape, device=device)
    net = torch.compile(model) if args.compile else model

    def step(fn=net):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = diffusion.loss(fn, x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with flop_counter() as counter:
        with torch.no_grad():
            model(x0, torch.zeros(args.batch, dtype=torch.long, device=device))
    fwd_flops = counter.get_total_flops()
    with flop_counter() as counter:
        step(model)  # eager: the counter sees every op
    counted_step_flops = counter.get_total_flops()
    for _ in range(args.warmup):
        step()
    times, peaks = [], []  # each step is paired with a matmul measurement right after it
    for _ in tqdm(range(args.steps), desc="train steps"):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
        peaks.append(matmul_flops(device, n, dtype))
    ratios = sorted(3 * fwd_flops / t / p for t, p in zip(times, peaks))
    sec, peak = min(times), max(peaks)
    print(f"machine: {machine(device)}")
    print(f"model: size {args.size}, {count_params(model) / 1e6:.2f}M params, 256 tokens, batch {args.batch}, "
          f"{args.precision}{', compiled' if args.compile else ', eager'}")
    print(f"forward: {fwd_flops / args.batch / 2e9:.3f} GMACs/sample; training FLOPs = 3 x forward = "
          f"{3 * fwd_flops / 1e9:.1f} GFLOP/step (counted fwd+bwd: {counted_step_flops / 1e9:.1f})")
    print(f"step: best {sec * 1e3:.1f} ms, mean {sum(times) / len(times) * 1e3:.1f} ms over {args.steps} "
          f"({args.batch / sec:.1f} samples/s)")
    print(f"achieved {3 * fwd_flops / sec / 1e9:.1f} GFLOP/s (best step) | {args.precision} matmul {n}^3 {peak / 1e9:.1f} "
          f"GFLOP/s (best) | utilisation {100 * ratios[len(ratios) // 2]:.1f}% (median over step/matmul pairs; "
          f"range {100 * ratios[0]:.1f}-{100 * ratios[-1]:.1f}%; target >= 40%)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="S", choices=list(SIZES), help="denoiser size (denoiser.SIZES)")
    p.add_argument("--batch", type=int, default=16, help="samples per training step")
    p.add_argument("--steps", type=int, default=5, help="timed training steps, each paired with a matmul timing")
    p.add_argument("--warmup", type=int, default=1, help="untimed training steps before timing")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="fp32, or bf16 autocast "
                   "(train.py --precision); the matmul it is compared with runs in the same precision")
    p.add_argument("--compile", action="store_true", help="torch.compile the denoiser (train.py --compile)")
    p.add_argument("--matmul", type=int, default=0, help="side n of the n^3 matmul (0: 2048 on the CPU, 8192 on a GPU)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default, all cores)")
    return p.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())
