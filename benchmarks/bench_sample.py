"""Wall time of cascaded sampling at depth L against depth 1, same steps and batch (paper §4.2, Table 6).

A depth-L model samples every level top-down (sample.sample_batch); its small latent levels (1, 4, ...
tokens) should cost what their forward FLOPs say, not a fixed per-step overhead. Glyph layout
(evaluate.LAYOUTS["glyphs"]: 128-d encoder, 32 px greyscale images, image patch 4), random-initialised
denoisers (only the time matters; a fresh adaLN-Zero denoiser outputs zero, which costs the same FLOPs).
Depth 1 and depth L alternate; the ratio is the median over --repeats of each pair's ratio, reported with
the forward-GMAC ratio and the process-CPU-time ratio (which a busy shared machine disturbs less).

    python benchmarks/bench_sample.py --depth 3 --model XS --n 128 --batch 128 --steps 20
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import hierarchy as H  # noqa: E402
import sample  # noqa: E402
from data import UsageError, machine, run_main  # noqa: E402
from denoiser import COND_PATHS, SIZES, Denoiser  # noqa: E402
from diffusion import SAMPLERS, Diffusion  # noqa: E402
from evaluate import LAYOUTS, cost_table  # noqa: E402


def glyph_levels(depth, size, device, cond_path="tokens"):
    """[(denoiser, Diffusion, meta)] of a random-initialised depth-``depth`` glyph model, top-down."""
    enc_dim, image_shape, patch = LAYOUTS["glyphs"]
    levels = H.level_specs(depth, enc_dim, image_shape, patch)
    out = []
    for k, lv in enumerate(levels):
        conds = levels[:k]
        meta = {"target": lv.shape, "sigmas": [H.sigma_for(c.grid, "none") for c in conds],
                "target_image": lv.image, "image_space": "pixels"}
        model = Denoiser(lv.shape, lv.patch, [c.shape for c in conds], size=size, cond_path=cond_path).to(device).eval()
        out.append((model, Diffusion("linear" if lv.image else "scaled_linear"), meta))
    return out


def wall(levels, args, device):
    """(wall seconds to sample --n images in batches of --batch with the levels, seconds per level top-down,
    process CPU seconds)."""
    generator = torch.Generator(device).manual_seed(0)
    weights, per_level = [args.cfg] * len(levels), [0.0] * len(levels)
    start, cpu = time.perf_counter(), time.process_time()
    for first in range(0, args.n, args.batch):
        _, seconds = sample.sample_batch(levels, weights, min(args.batch, args.n - first), args, device, generator)
        per_level = [a + b for a, b in zip(per_level, seconds)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, per_level, time.process_time() - cpu


def main(args):
    if args.depth < 2 or args.n < 1 or args.batch < 1 or args.repeats < 1:
        raise UsageError("--depth must be >= 2; --n, --batch and --repeats >= 1")
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {d: glyph_levels(d, args.model, device, args.cond_path) for d in (1, args.depth)}
    times, cpu, per_level = {1: [], args.depth: []}, {1: [], args.depth: []}, []
    wall(models[args.depth], argparse.Namespace(**{**vars(args), "n": args.batch, "steps": 2}), device)  # warm-up
    for _ in range(args.repeats):
        for d in (1, args.depth):
            seconds, levels, cpu_seconds = wall(models[d], args, device)
            times[d].append(seconds)
            cpu[d].append(cpu_seconds)
        per_level.append(levels)
    gmacs = {d: sum(g for *_, g in cost_table(args.model, "glyphs", [d], args.cond_path)) for d in (1, args.depth)}
    print(f"machine: {machine(device)}")
    print(f"glyph layout, model {args.model}, {args.n} samples in batches of {args.batch}, {args.sampler} "
          f"{args.steps} steps per level, guidance w = {args.cfg:g}")
    for d in (1, args.depth):
        print(f"depth {d}: {statistics.median(times[d]):.2f} s (median of {args.repeats}: "
              f"{', '.join(f'{t:.2f}' for t in times[d])}), {gmacs[d]:.3f} forward GMACs per image")
    costs = cost_table(args.model, "glyphs", [args.depth], args.cond_path)
    print(f"depth {args.depth} per level (median): " + ", ".join(
        f"{name} {statistics.median(s):.2f} s ({g:.3f} GMACs)" for (_, _, name, _, g), s in zip(costs, zip(*per_level))))
    print(f"forward-GMAC ratio depth-{args.depth} / depth-1: {gmacs[args.depth] / gmacs[1]:.3f}")
    ratio = lambda t: statistics.median(b / a for a, b in zip(t[1], t[args.depth]))  # noqa: E731  per alternating pair
    print(f"depth-{args.depth} / depth-1 process CPU time: {ratio(cpu):.3f} (a check on a shared machine)")
    print(f"depth-{args.depth} / depth-1 wall: {ratio(times):.3f}")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--depth", type=int, default=3, help="depth L compared with depth 1")
    p.add_argument("--model", choices=list(SIZES), default="XS", help="denoiser size of every level")
    p.add_argument("--n", type=int, default=128, help="samples per timing")
    p.add_argument("--batch", type=int, default=128, help="samples per batch (reproduce.py: 128)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps per level (reproduce.py: 50)")
    p.add_argument("--sampler", choices=SAMPLERS, default="dpm++", help="sampler (sample.py --sampler)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM η")
    p.add_argument("--cfg", type=float, default=0.0, help="guidance weight of every level (0: none, reproduce.py's quick preset)")
    p.add_argument("--gamma", type=float, default=0.3, help="decay of the condition noise under guidance")
    p.add_argument("--repeats", type=int, default=3, help="timings of each depth, alternating")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--cond-path", choices=COND_PATHS, default="tokens",
                   help="how each level takes the levels above it (train.py --cond-path; grid keeps the image level at 64 tokens)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 autocast (sample.py --precision)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    return p


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_main(main, get_parser().parse_args())
