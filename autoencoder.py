"""The bottom level's autoencoder for a dataset without one: a small KL autoencoder trained on the glyphs.

The paper's image level is not pixels but the SD-VAE latent (paper §4.1, shared/paper.md §2.2: z_1 = 32×32×4 for
256 px images, decoded by the SD-VAE after sampling). The decoder draws the fine detail, and the hierarchy's
denoisers model what is left. No VAE knows glyphs, so this script trains one of the same architecture
(diffusers' ``AutoencoderKL``, Rombach et al. 2022 §3) at glyph scale: 32 px greyscale -> 8×8×4 latents (a factor
4, one channel in and out), reconstruction L1 plus a small KL term, without SD-VAE's perceptual and adversarial
losses. It is saved as a diffusers folder whose ``scaling_factor`` makes the posterior means of the training images
unit-variance (what LDM's 0.18215 does for the SD-VAE), and any script takes it as ``--image-space sd-vae --vae
FOLDER`` (hierarchy.py, train.py, sample.py read the scale from the cache). Not in the paper; the README's
"Differences from the paper" says so. Training keeps its state (weights, AdamW, the batch generator) in
``<out>.partial.pt`` every ``--ckpt-every`` steps; ``--resume`` continues an interrupted run from it, to the same
weights as a run that was never interrupted.

    python autoencoder.py --data glyphs --out checkpoints/glyph-vae        # interrupted? add --resume
"""
import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from tqdm import tqdm

import data
from denoiser import native_bf16

# (block_out_channels, layers_per_block): len(block_out_channels) - 1 halvings of the side (glyph: 32 px -> 8)
SIZES = {"glyph": ((32, 64, 64), 1), "tiny": ((8, 8), 1)}
LATENT_CHANNELS = 4  # SD-VAE's
# the flags a partial run must share with the run that resumes it (--steps may grow)
RESUME_FLAGS = ("data", "image_size", "size", "batch_size", "lr", "kl_weight", "seed")


def build(size="glyph", channels=1, image_size=32):
    """A randomly initialised AutoencoderKL of ``size`` (SIZES) for ``channels``-channel images."""
    blocks, layers = SIZES[size]
    return AutoencoderKL(in_channels=channels, out_channels=channels, down_block_types=("DownEncoderBlock2D",) * len(blocks),
                         up_block_types=("UpDecoderBlock2D",) * len(blocks), block_out_channels=blocks,
                         layers_per_block=layers, latent_channels=LATENT_CHANNELS, norm_num_groups=min(blocks) // 2,
                         sample_size=image_size)


def loss_terms(vae, x, generator=None):
    """(L1 reconstruction error per element, KL to N(0, I) per element of x) of a batch x (B, C, H, W) in [-1, 1],
    decoding one posterior sample."""
    post = vae.encode(x).latent_dist
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=generator, device=x.device)
    y = vae.decode(z).sample
    return (y.float() - x).abs().mean(), post.kl().mean() / x[0].numel()


def scaling_factor(vae, images, batch_size=256):
    """1 / std of the posterior means of ``images`` (N, C, H, W): the latents' scale to unit variance."""
    with torch.no_grad():
        means = torch.cat([vae.encode(images[i:i + batch_size]).latent_dist.mean.float()
                           for i in range(0, len(images), batch_size)])
    return 1.0 / means.std().item()


def reconstruct(vae, images, batch_size=256):
    """Decoded posterior means of ``images`` (N, C, H, W), clamped to [-1, 1]."""
    with torch.no_grad():
        return torch.cat([vae.decode(vae.encode(images[i:i + batch_size]).latent_dist.mean).sample.clamp(-1, 1)
                          for i in range(0, len(images), batch_size)])


def split_images(name, split, image_size, data_dir):
    """Every image of a split as one float tensor (N, C, H, W) in [-1, 1] (the glyph sets fit in memory)."""
    ds = data.build_dataset(name, split, image_size, data_dir=data_dir)
    return torch.stack([ds[i][0] for i in range(len(ds))])


def train(args):
    """Train, set the scaling factor, save the diffusers folder (written whole, then renamed into place) with the
    held-out reconstructions and report.json; returns the held-out reconstruction errors {"l1", "mse"}."""
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    images = split_images(args.data, "train", args.image_size, args.data_dir).to(device)
    vae = fit(build(args.size, images.shape[1], args.image_size).to(device), images, args)
    vae.register_to_config(scaling_factor=scaling_factor(vae, images[:4096]))
    tmp = Path(args.out).with_name(Path(args.out).name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp)
    errors = held_out_reconstructions(vae, args, tmp)
    flags = ("steps",) + RESUME_FLAGS
    (tmp / "report.json").write_text(json.dumps(errors | {k: getattr(args, k) for k in flags}, indent=1))
    shutil.rmtree(args.out, ignore_errors=True)
    tmp.rename(args.out)
    partial_path(args.out).unlink(missing_ok=True)
    return errors


def partial_path(out):
    """Where an unfinished training run of ``out`` keeps its state."""
    return Path(out).with_name(Path(out).name + ".partial.pt")


def load_partial(vae, opt, generator, args):
    """Restore an interrupted run (--resume) into ``vae``, ``opt`` and ``generator``; returns its step (0: none).
    One line if it was trained with other flags."""
    path = partial_path(args.out)
    if not (args.resume and path.exists()):
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)  # a generator state stays on the CPU
    differ = [f"--{k.replace('_', '-')} {state['flags'][k]}" for k in RESUME_FLAGS if state["flags"][k] != getattr(args, k)]
    if differ:
        raise data.UsageError(f"{path} was trained with {', '.join(differ)}; pass those to --resume it, or delete it")
    vae.load_state_dict(state["vae"])
    opt.load_state_dict(state["opt"])
    generator.set_state(state["generator"])
    return state["step"]


def save_partial(vae, opt, generator, step, args):
    state = {"vae": vae.state_dict(), "opt": opt.state_dict(), "generator": generator.get_state(), "step": step,
             "flags": {k: getattr(args, k) for k in RESUME_FLAGS}}
    data.atomic_write(partial_path(args.out), lambda tmp: torch.save(state, tmp))


def fit(vae, images, args):
    """--steps AdamW steps on random batches of ``images`` (N, C, H, W), from the partial run's step with --resume,
    saving the state every --ckpt-every steps; returns the VAE in eval mode."""
    device = images.device
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    generator = torch.Generator(device).manual_seed(args.seed)
    start = load_partial(vae, opt, generator, args)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and native_bf16(device))
    bar = tqdm(range(start, args.steps), desc="glyph VAE", unit="step", initial=start, total=args.steps)
    for step in bar:
        x = images[torch.randint(len(images), (args.batch_size,), generator=generator, device=device)]
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            rec, kl = loss_terms(vae, x, generator)
        loss = rec + args.kl_weight * kl
        if not torch.isfinite(loss):
            raise data.UsageError(f"the autoencoder's loss became {loss.item()}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(l1=f"{rec.item():.4f}", kl=f"{kl.item():.3f}", refresh=False)
        if (step + 1) % args.ckpt_every == 0 and step + 1 < args.steps:
            save_partial(vae, opt, generator, step + 1, args)
    return vae.eval()


def held_out_reconstructions(vae, args, folder):
    """Reconstruct the held-out split into ``folder``/reconstructions.npz (uint8, the samples' format: its FID is
    ``evaluate.py fid FOLDER/reconstructions.npz data:glyphs:test``); returns the errors {"l1", "mse"} (images in
    [-1, 1])."""
    test = split_images(args.data, "test", args.image_size, args.data_dir).to(vae.device)
    y = reconstruct(vae, test)
    errors = {"l1": (y - test).abs().mean().item(), "mse": ((y - test) ** 2).mean().item()}
    data.save_npz(Path(folder) / "reconstructions.npz", arr_0=data.to_uint8(y.float()))
    return errors


def main(argv):
    args = get_parser().parse_args(argv)
    for flag, low in (("--steps", 1), ("--batch-size", 1), ("--image-size", 8), ("--ckpt-every", 1)):
        data.check_range(flag, getattr(args, flag[2:].replace("-", "_")), low)
    data.check_range("--lr", args.lr, 0, strict=True)
    data.check_range("--kl-weight", args.kl_weight, 0)
    if args.reconstruct:
        if not (Path(args.out) / "config.json").exists():
            raise data.UsageError(f"--reconstruct reads a trained VAE folder; {args.out} holds none")
        errors = held_out_reconstructions(AutoencoderKL.from_pretrained(args.out).to(args.device).eval(), args, args.out)
        print(f"wrote {Path(args.out) / 'reconstructions.npz'}: held-out L1 {errors['l1']:.4f}, MSE {errors['mse']:.4f}")
        return errors
    if Path(args.out).exists() and not args.overwrite:
        raise data.UsageError(f"{args.out} exists; pass --overwrite to retrain it, or another --out")
    if partial_path(args.out).exists() and not (args.resume or args.overwrite):
        raise data.UsageError(f"{partial_path(args.out)} holds an interrupted run of {args.out}; pass --resume to "
                              "continue it, or --overwrite to start over")
    start = time.time()
    errors = train(args)
    side = args.image_size // 2 ** (len(SIZES[args.size][0]) - 1)
    print(f"wrote {args.out} ({time.time() - start:.0f}s): {args.image_size} px -> {side}x{side}x{LATENT_CHANNELS} latents; "
          f"held-out reconstruction L1 {errors['l1']:.4f}, MSE {errors['mse']:.4f} (images in [-1, 1])")
    return errors


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=data.HelpFormatter)
    p.add_argument("--data", default="glyphs", help=f"dataset whose training split it learns: {', '.join(data.DATASETS)}")
    p.add_argument("--data-dir", default="data", help="where the glyph dataset cache lives")
    p.add_argument("--image-size", type=int, default=32, help="image size in pixels")
    p.add_argument("--size", choices=list(SIZES), default="glyph", help="architecture (SIZES; tiny: for tests)")
    p.add_argument("--steps", type=int, default=1000, help="training steps (about 6 min at glyph size on 2 CPU cores)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (constant)")
    p.add_argument("--kl-weight", type=float, default=1e-4,
                   help="weight of the KL term (per latent element over per pixel) against the L1 reconstruction")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="bf16 autocast (fp32 weights) or fp32; auto: bf16 where the device computes it natively")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the batches")
    p.add_argument("--out", default="checkpoints/glyph-vae", help="the diffusers folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (and start over an interrupted run)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted run of --out (<out>.partial.pt)")
    p.add_argument("--ckpt-every", type=int, default=100, help="steps between saves of the training state")
    p.add_argument("--reconstruct", action="store_true",
                   help="train nothing: write the held-out reconstructions.npz of the trained VAE in --out")
    return p


if __name__ == "__main__":
    data.run_main(main, sys.argv[1:])
