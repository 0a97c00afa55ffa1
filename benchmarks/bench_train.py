"""train.py's loop against its model: is a training step as fast as the denoiser's own step? (paper §4.1-4.2)

For one level of a depth-L model (train.py's flags: data, depth, level, model size, batch, device, precision,
compile) it measures, with train.py's own functions:

- a breakdown of one step run sequentially, synchronised after each phase: batch assembly (cache read, SVD
  reduction, host→device copy), random draws (t, ε, σ-noise, dropout), forward+backward, optimizer, EMA and
  the NaN-check synchronisation;
- the model-only step: forward+backward+AdamW on one batch already on the device (what bench_step.py times);
- train.py itself (train.train, a throw-away run folder), whose steps/s are read from its log.

The model-only step and train.py are each timed over at least --window seconds, in --repeats pairs run back to
back; the last line is the median ratio of train.py's step rate to the model-only step rate (goal >= 0.90).
The EMA row is a mean per step (folded in every --ema-every steps, as train.py does). The latent cache is
built when missing (--pretrained random: a seeded untrained encoder, enough for timing).

    python benchmarks/bench_train.py --level 1 --depth 3 --model XS --batch 64 --image-patch 4
    python benchmarks/bench_train.py --level 3 --depth 3 --model XS --batch 64
"""
import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import hierarchy as H  # noqa: E402
import train  # noqa: E402
from data import UsageError, machine, run_main  # noqa: E402
from denoiser import count_params  # noqa: E402
from diffusion import Diffusion  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Phases:
    """Seconds per named phase, each timed between two synchronisations."""

    def __init__(self, device):
        self.device, self.times = device, {}

    def __call__(self, name, fn, *a, **kw):
        sync(self.device)
        start = time.perf_counter()
        out = fn(*a, **kw)
        sync(self.device)
        self.times.setdefault(name, []).append(time.perf_counter() - start)
        return out

    def median(self, name):
        return statistics.median(self.times[name])

    def typical(self, name):
        """The median, or for the EMA, run one step in --ema-every, the mean per step."""
        return statistics.mean(self.times[name]) if name == "EMA" else self.median(name)


def train_args(args, run_dir, steps, log_every):
    """train.py's arguments for this benchmark (a fresh run folder, no checkpoint but the last)."""
    return train.get_parser().parse_args([
        "--data", args.data, "--pretrained", args.pretrained, "--cache-dir", args.cache_dir, "--data-dir", args.data_dir,
        "--level", str(args.level), "--depth", str(args.depth), "--model", args.model, "--batch-size", str(args.batch),
        "--device", args.device, "--precision", args.precision, "--steps", str(steps), "--log-every", str(log_every),
        "--ckpt-every", str(10 ** 9), "--ema-every", str(args.ema_every), "--run-dir", str(run_dir)]
        + (["--image-patch", str(args.image_patch)] if args.image_patch else []) + (["--compile"] if args.compile else [])
        + (["--reduced-cache"] if args.reduced_cache else []))


def breakdown_and_model_only(targs, args, device):
    """(Phases of the sequential step, model-only step seconds (list), model, meta) with train.py's functions."""
    hier = H.build_cache(H.resolve_defaults(targs))
    target, conds, sigmas = train.level_plan(targs, hier)
    meta = train.level_meta(targs, hier, target, conds, sigmas)
    torch.manual_seed(0)
    model = train.build_model(meta).to(device)
    ema = deepcopy(model).requires_grad_(False)
    ema_update = train.EMAUpdate(ema, model, background=False)  # inline: the phase is timed alone
    opt = train.make_optimizer(model, targs, device)
    net = torch.compile(model) if targs.compile else model
    diffusion = Diffusion(meta["schedule"], targs.T, targs.prediction).to(device)
    dataset = train.level_data(targs, hier, target, conds)
    nan_watch = train.NanWatch(0, device, "-")
    phases = Phases(device)

    def forward_backward(x, y, t, noise, noisy, drop):
        opt.zero_grad(set_to_none=True)
        loss = train.level_loss(net, diffusion, x, t, noise, noisy, y if meta["num_classes"] else None, None, drop,
                                targs.precision)
        loss.backward()
        return loss

    for k in range(args.warmup + args.steps):
        idx = train.batch_indices(len(dataset), targs.batch_size, 0, 1, targs.seed, k)
        read, reduce, image = {}, {}, None
        for lv in dataset.levels:  # dataset.level, split into its read and its reduction
            if lv.image:
                image = phases("cache read", dataset.level, lv, idx)
            else:
                read[lv.grid] = phases("cache read", lambda: dataset.feats[lv.grid][idx].astype(np.float32))
                reduce[lv.grid] = phases("reduction", dataset.reduce[lv.grid], read[lv.grid])
        loaded = [image if lv.image else reduce[lv.grid] for lv in dataset.levels], torch.from_numpy(dataset.labels[idx]), idx
        zs_all, y, _ = phases("host->device", lambda: ([z.to(device) for z in loaded[0]], loaded[1].to(device), idx))
        x, zs, y, _ = phases("random draws", dataset.finish, (zs_all, y, idx))
        t, noise, noisy, drop = phases("random draws", train.step_draws, targs, k, 0, 1, x, zs, sigmas)
        loss = phases("forward+backward", forward_backward, x, y, t, noise, noisy, drop)
        phases("optimizer", opt.step)
        if (k + 1) % targs.ema_every == 0:  # train.py's cadence (--ema-every); its row is a mean per step
            decay = train.ema_decay_since(targs.ema, k + 1 - targs.ema_every, k)
            phases("EMA", ema_update.update, decay)
        else:
            phases.times.setdefault("EMA", []).append(0.0)
        phases("sync (NaN check)", lambda: (nan_watch.add(k, loss), nan_watch.check()))
        if k + 1 == args.warmup:
            phases.times.clear()
    def model_only(steps):  # the same step on one batch that stays on the device: mean seconds over ``steps``,
        sync(device)          # timed as train.py's log times its steps/s (a median would flatter the model-only side)
        start = time.perf_counter()
        for _ in range(steps):
            forward_backward(x, y, t, noise, noisy, drop)
            opt.step()
        sync(device)
        return (time.perf_counter() - start) / steps
    return phases, model_only, model, meta, len(dataset)


def loop_rate(targs_fn, steps):
    """Steps/s of train.train itself over ``steps`` steps, after a warm-up interval as long, read from its log."""
    with tempfile.TemporaryDirectory() as run_dir:
        ckpt = train.train(targs_fn(run_dir, 2 * steps, steps))
        log = [json.loads(line) for line in (Path(ckpt).parent / "log.txt").read_text().splitlines()]
    return log[-1]["steps_per_s"]


def main(args):
    if min(args.batch, args.steps, args.repeats, args.ema_every) < 1 or args.window < 0:
        raise UsageError("--batch, --steps, --repeats and --ema-every must be >= 1, --window >= 0")
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    targs_fn = lambda run_dir, steps, log_every: train_args(args, run_dir, steps, log_every)  # noqa: E731
    phases, model_only_fn, model, meta, n_items = breakdown_and_model_only(targs_fn("-", 1, 1), args, device)
    names = ["cache read", "reduction", "host->device", "random draws", "forward+backward", "optimizer", "EMA",
             "sync (NaN check)"]
    total = sum(phases.typical(n) for n in names if n in phases.times)
    timed = max(args.steps, math.ceil(args.window / total))  # windows of a short step are noisy
    pairs = []  # (train.py steps/s, model-only seconds) measured back to back, so that both see the same load
    for _ in range(args.repeats):
        pairs.append((loop_rate(targs_fn, timed), model_only_fn(timed)))
    rate, model_only = (statistics.median(v) for v in zip(*pairs))
    ratio = statistics.median(r * s for r, s in pairs)
    print(f"machine: {machine(device)}")
    print(f"level {args.level} of depth {args.depth}: {meta['key']} | {args.model}, {count_params(model) / 1e6:.2f}M "
          f"params | batch {args.batch} | {args.precision}{', compiled' if args.compile else ''} | {n_items} items")
    print(f"one step run sequentially, synchronised after each phase (median of {args.steps} steps, ms):")
    for name in names:
        if name in phases.times:
            print(f"  {name:<18}{1e3 * phases.typical(name):9.2f}")
    print(f"  {'total':<18}{1e3 * total:9.2f}")
    print(f"model-only step (inputs on the device; mean of {timed}): {1e3 * model_only:.2f} ms = {1 / model_only:.2f} steps/s")
    print(f"train.py loop: {rate:.2f} steps/s")
    print(f"(medians over {args.repeats} pairs, each a run of train.py timed over {timed} steps after "
          f"{timed} warm-up steps, then {timed} model-only steps; ratio per pair: "
          f"{', '.join(f'{r * s:.3f}' for r, s in pairs)})")
    print(f"end-to-end / model-only: {ratio:.3f}")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="glyphs", help="dataset (train.py --data)")
    p.add_argument("--pretrained", default="random", help="encoder weights of the latent cache (random: timing only)")
    p.add_argument("--cache-dir", default="cache", help="where latent caches are written")
    p.add_argument("--data-dir", default="data", help="where the glyph dataset cache lives")
    p.add_argument("--depth", type=int, default=3, help="number of levels L")
    p.add_argument("--level", type=int, default=1, help="level to train: 1 = image, --depth = top")
    p.add_argument("--model", default="XS", help="denoiser size (denoiser.SIZES)")
    p.add_argument("--image-patch", type=int, default=4, help="patch of the image level (0: train.py's default)")
    p.add_argument("--batch", type=int, default=64, help="global batch")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 autocast (train.py --precision)")
    p.add_argument("--compile", action="store_true", help="torch.compile the denoiser")
    p.add_argument("--reduced-cache", action="store_true", help="read the reduced latents (hierarchy.py --reduced-cache)")
    p.add_argument("--steps", type=int, default=10, help="steps of the breakdown, and the fewest timed steps of the "
                   "model-only step and of train.py's log interval")
    p.add_argument("--window", type=float, default=2.0, help="seconds the model-only and train.py timings each span at "
                   "least (more steps for a short step: ten 45 ms steps are too few to time)")
    p.add_argument("--ema-every", type=int, default=train.get_parser().get_default("ema_every"),
                   help="train.py --ema-every")
    p.add_argument("--repeats", type=int, default=5, help="pairs of (train.py run, model-only timing), back to back")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the breakdown and the model-only step")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    return p


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_main(main, get_parser().parse_args())
