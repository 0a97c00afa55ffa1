"""Training step with the latent cache vs encoding every batch on the fly (why hierarchy.py caches).

Depth 3 at the paper's ImageNet scale: the image level (SD-VAE latents 4×32×32, patch 2) conditioned on
z_3 (1×1) and z_2 (2×2, four 128 px crops), encoder ViT-B-16 (random weights: only the cost matters),
SD-VAE encoder with the Stable Diffusion architecture (random weights). Both paths run the same
denoiser step (forward + backward + AdamW); the on-the-fly path first encodes 256 px images with the
VAE and the encoder, the cached path reads memory-mapped features and reduces them.

    python benchmarks/bench_cache.py --model S --batch 8
"""
import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import hierarchy as H  # noqa: E402
from data import machine  # noqa: E402
from denoiser import Denoiser  # noqa: E402
from diffusion import Diffusion  # noqa: E402
from encoder import Encoder  # noqa: E402


def sd_vae():
    """The SD-VAE architecture (diffusers' AutoencoderKL defaults for SD 1.x), random weights."""
    from diffusers import AutoencoderKL
    return AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2).eval()


def timed(fn, repeats):
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main(args):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc = Encoder("ViT-B-16", None, args.device)
    vae = sd_vae().to(args.device)
    levels = H.level_specs(3, enc.dim, (4, 32, 32), 2)                       # z_3 1×1, z_2 2×2, image 4×32×32
    model = Denoiser(levels[-1].shape, 2, [lv.shape for lv in levels[:-1]], size=args.model).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    diffusion = Diffusion()
    reductions = {lv.grid: H.Reduction(H.fit_pca(np.random.randn(4096, enc.dim)), lv.channels) for lv in levels[:-1]}
    B = args.batch
    images = torch.rand(B, 3, 256, 256, device=args.device) * 2 - 1

    tmp = Path(tempfile.mkdtemp())
    n = 4 * B
    cache = {m: np.lib.format.open_memmap(tmp / f"{m}.npy", "w+", np.float16, (n, enc.dim, m, m)) for m in (1, 2)}
    moments = np.lib.format.open_memmap(tmp / "vae.npy", "w+", np.float16, (n, 8, 32, 32))

    def train_step(x, conds):
        loss = diffusion.loss(lambda xt, t: model(xt, t, conds), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def cached():
        idx = sorted(np.random.choice(n, B, replace=False))
        conds = [reductions[m](cache[m][idx].astype(np.float32)).to(args.device) for m in (1, 2)]
        mean, std = torch.from_numpy(moments[idx].astype(np.float32)).to(args.device).chunk(2, 1)
        train_step((mean + std * torch.randn_like(std)) * H.VAE_SCALE, conds)

    def on_the_fly():
        with torch.no_grad():
            x = vae.encode(images).latent_dist.sample() * H.VAE_SCALE
            conds = [reductions[m](enc.level_features(images, m, min_crop=64).float()) for m in (1, 2)]
        train_step(x, conds)

    t_cached, t_fly = timed(cached, args.repeats), timed(on_the_fly, args.repeats)
    print(f"machine: {machine(args.device)}")
    print(f"depth 3, image level 4x32x32 patch 2, denoiser {args.model}, batch {B}, encoder ViT-B-16 + SD-VAE at 256 px")
    print(f"cached step     {t_cached:8.3f} s")
    print(f"on-the-fly step {t_fly:8.3f} s")
    print(f"cache speed-up  {t_fly / t_cached:8.1f}x (target >= 3x)")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="S", help="denoiser size")
    p.add_argument("--batch", type=int, default=8, help="images per step")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per path")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device")
    return p


if __name__ == "__main__":
    main(get_parser().parse_args())
