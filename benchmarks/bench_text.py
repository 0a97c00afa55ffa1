"""Text- against class-conditional training steps on the glyph set (paper §4: the class and text modes).

A text-conditional step differs from a class-conditional one by the text tower (the frozen CLIP text encoder,
encoder.py) and how the caption enters the denoiser (denoiser.py, train.py --text-path): "tokens", the paper's
in-context text tokens (the text tower's 32 token states for the glyph CLIP), or "adaln", CLIP's pooled text
embedding added to the adaLN vector as the class embedding is. With the caption cache (Encoder.cached_text) the
tower runs once per distinct caption, so a step pays only for what enters the denoiser. Each level of a depth-L
glyph model (32 px, patch 4) is timed as train.py runs it: forward + ε-loss + backward + AdamW, the batch's
captions drawn from the glyph definitions; class, text (tokens), text (adaln) and uncached text (tokens, the
tower every step) steps are interleaved so that all see the same machine load, and each time is the median over
the steps. The ratios printed last are the image level's and the sum over the levels (one step of every level:
what training the model costs).

    python benchmarks/bench_text.py --size XS --batch 64 --depth 3 --steps 3 --threads 1
"""
import argparse
import os
import statistics
import sys
import time

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import hierarchy as H  # noqa: E402
from denoiser import SIZES, Denoiser  # noqa: E402
from diffusion import Diffusion  # noqa: E402
from encoder import Encoder  # noqa: E402

IMAGE_SHAPE, IMAGE_PATCH = (1, 32, 32), 4  # the glyph image level (reproduce.py)


def make_step(level, conds, size, batch, encoder, text_fn, generator, text_path="tokens"):
    """One training step of a level on random targets: class-conditional when ``text_fn`` is None, else
    text-conditional with the text input ``text_fn(captions)`` entering by ``text_path``."""
    torch.manual_seed(0)
    text_shape = (encoder.dim,) if text_path == "adaln" else encoder.text_shape
    model = Denoiser(level.shape, level.patch, [c.shape for c in conds], 0 if text_fn else 214,
                     text_shape if text_fn else None, size, text_path=text_path).train()
    diffusion = Diffusion()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x0 = torch.randn(batch, *level.shape)                                           # (B, C, M, M)
    zs = [torch.randn(batch, *c.shape) for c in conds]

    def step(captions):
        y = None if text_fn else torch.randint(0, 214, (batch,), generator=generator)
        text = text_fn(captions) if text_fn else None                               # (B, 32, 192) or (B, 128)
        loss = diffusion.loss(lambda xt, t: model(xt, t, zs, y, text), x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main(args):
    for flag, low in (("--batch", 1), ("--steps", 1), ("--depth", 1)):
        data.check_range(flag, getattr(args, flag[2:]), low)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    captions = sorted({d for d, _ in data.read_unihan(data.default_unihan()).values()})
    torch.manual_seed(0)
    encoder = Encoder("glyph-clip", None)  # random weights: the cost of the tower does not depend on them
    cache = Encoder("glyph-clip", None)
    fill = {}
    for pooled in (False, True):  # what train.py does before its first step, for each text path
        start = time.perf_counter()
        cache.cache_captions(captions, pooled)
        fill[pooled] = time.perf_counter() - start
    generator = torch.Generator().manual_seed(0)
    levels = H.level_specs(args.depth, encoder.dim, IMAGE_SHAPE, IMAGE_PATCH)
    totals = {"class": 0.0, "text": 0.0, "adaln": 0.0, "uncached": 0.0}
    print(f"machine: {data.machine(torch.device('cpu'))}")
    print(f"denoiser {args.size}, batch {args.batch}, depth {args.depth}; text tower: glyph-clip, context "
          f"{encoder.text_shape[0]} x {encoder.text_shape[1]}, pooled {encoder.dim}; {len(captions)} distinct definitions, "
          f"caption cache filled in {fill[False]:.1f} s (token states), {fill[True]:.1f} s (pooled; once per training run)")
    for k, level in enumerate(levels):
        conds = levels[:k]
        steps = {"class": make_step(level, conds, args.size, args.batch, encoder, None, generator),
                 "text": make_step(level, conds, args.size, args.batch, encoder, cache.cached_text, generator),
                 "adaln": make_step(level, conds, args.size, args.batch, encoder,
                                    lambda c: cache.cached_text(c, pooled=True), generator, "adaln"),
                 "uncached": make_step(level, conds, args.size, args.batch, encoder, encoder.encode_text, generator)}
        times = {name: [] for name in steps}
        for i in tqdm(range(args.steps + 1), desc=f"level {args.depth - k}"):
            idx = torch.randint(0, len(captions), (args.batch,), generator=generator).tolist()
            for name, step in steps.items():
                t0 = time.perf_counter()
                step([captions[j] for j in idx])
                if i:  # the first step of each is a warm-up
                    times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(t) for name, t in times.items()}
        for name in totals:
            totals[name] += med[name]
        print(f"level {args.depth - k} ({level.name}): class {med['class'] * 1e3:.1f} ms, text {med['text'] * 1e3:.1f} ms "
              f"(tokens), {med['adaln'] * 1e3:.1f} ms (adaln), {med['uncached'] * 1e3:.1f} ms (tokens, text tower every "
              f"step); text / class: tokens {med['text'] / med['class']:.2f}, adaln {med['adaln'] / med['class']:.2f}")
    print(f"all {args.depth} levels, one step each: class {totals['class'] * 1e3:.1f} ms, text {totals['text'] * 1e3:.1f} ms "
          f"(tokens), {totals['adaln'] * 1e3:.1f} ms (adaln), {totals['uncached'] * 1e3:.1f} ms (tokens, uncached)")
    # the last level timed is the image level (levels run top-down)
    print(f"image level, text / class step: tokens {med['text'] / med['class']:.2f}, adaln {med['adaln'] / med['class']:.2f} "
          "(target <= 1.2)")
    print(f"all levels, text / class step: tokens {totals['text'] / totals['class']:.2f}, adaln "
          f"{totals['adaln'] / totals['class']:.2f} (target <= 1.2; tokens without the cache "
          f"{totals['uncached'] / totals['class']:.2f})")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", default="XS", choices=list(SIZES), help="denoiser size (denoiser.SIZES)")
    p.add_argument("--batch", type=int, default=64, help="samples per training step (the glyph presets' 64)")
    p.add_argument("--depth", type=int, default=3, help="levels of the glyph model; each is timed")
    p.add_argument("--steps", type=int, default=10, help="timed steps per level and mode (after one warm-up)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default, all cores)")
    return p


if __name__ == "__main__":
    data.run_main(main, get_parser().parse_args())
