"""Cascaded sampling from a nested diffusion model, top level first, with per-level CFG and γ-noise.

Paper §4.2 (shared/paper.md §5): z_L ~ p(z_L), then z_l ~ p(z_l | z_{>l}) for l = L-1 … 1, each level
conditioned on every level generated above it (non-Markovian); the image level is decoded by the
SD-VAE when it holds VAE latents. Without guidance the conditions are used clean; with guidance
(ε̃ = ε_c + w(ε_c − ε_u), per-level weights, larger on top) they are noised as
ẑ ~ N(z, (t/T)^γ σ² I), γ = 0.3 (Table 3). Paper defaults: unconditional w = 0.8, class-conditional
[0.5, 0.4, 0.3, 0.2, 0.1] top-down, text 1.0.

``--reference IMAGE --keep K`` is the paper's Fig. 1: encode a real image through the hierarchy, keep its
top K latent levels, resample the rest. ``--reference data:glyphs:test`` does it for every image of a split.

    python sample.py --depth 5
    python sample.py --depth 3 --run runs/glyphs --reference glyph:水 --keep 2
"""
import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Subset
from tqdm import tqdm

import data
import hierarchy as H
from denoiser import COND_PATHS, CONDS, TEXT_PATHS, load_denoiser
from diffusion import PREDICTIONS, SAMPLERS, Diffusion, cfg_weights

# ----------------------------------------------------------------------------------------------------
# Finding and loading the levels of a depth-L model
# ----------------------------------------------------------------------------------------------------

# what a level's meta.json says when it predates a version key (train.py's defaults, the paper's choices)
VERSION_DEFAULTS = {"model": None, "cond_path": "tokens", "text_path": "tokens", "prediction": "eps", "model_guidance": 0.0}


def top_channels(meta):
    """Channels of the top latent level that a level reads or generates (None: an image level reading none)."""
    top = H.meta_levels(meta)[0]
    return None if top.image else top.channels


def read_metas(run, cond, **versions):
    """meta.json of every trained level (one with a checkpoint) in the folder ``run`` of this ``cond`` and the
    given ``versions`` (keys of VERSION_DEFAULTS, None = any): size (--model), how latent conditions enter
    (--cond-path; the top level has none), how the caption enters (--text-path; only text levels have one), what
    the network predicts (--prediction), the model-guidance weight it was trained with (--model-guidance; a level
    with nothing to guide has none); and ``top_channels``, the top latent level's width (--top-channels)."""
    metas = []
    for path in sorted(Path(run).glob("*/meta.json")):
        if (path.parent / "ckpt.pt").exists():
            remedy = "restore it, or delete its folder and retrain the level"
            metas.append(data.read_json(path, remedy) | {"dir": str(path.parent)})
    def fits(m, key, want):
        if key == "top_channels":
            return want is None or top_channels(m) in (None, want)
        return (want is None or (key == "cond_path" and not m["cond_grids"]) or (key == "text_path" and cond != "text")
                or (key == "model_guidance" and not m["cond_grids"] and cond == "none")
                or m.get(key, VERSION_DEFAULTS[key]) == want)
    return [m for m in metas if m.get("cond") == cond and all(fits(m, k, v) for k, v in versions.items())]


def match_levels(metas, depth, sigma=None):
    """The levels L … 1 of a depth-L model among ``metas``, top-down; at the first level missing, the
    level number instead of a list (matched on what each level generates and is conditioned on, so levels
    shared with shallower models are found too)."""
    found = []
    for level in range(depth, 0, -1):
        grids = [2 ** k for k in range(depth - level)]
        image = level == 1
        match = [m for m in metas if m["cond_grids"] == grids and m["target_image"] == image
                 and (image or m["target"][1] == 2 ** (depth - level))
                 and (sigma is None or m["sigmas"] == list(sigma[:depth - level]))]
        if not match:
            return level
        if len(match) > 1:
            raise data.UsageError(f"level {level} has {len(match)} trained versions in {Path(match[0]['dir']).parent} "
                                  f"({', '.join(Path(m['dir']).name for m in match)}); pick one with --sigma, --model, "
                                  "--cond-path, --text-path, --prediction, --model-guidance or --top-channels")
        found.append(match[0])
    return found


def holds_model(run, depth, cond, sigma=None, **versions):
    """Whether the folder ``run`` holds every level of the model (in one version or several)."""
    try:
        return isinstance(match_levels(read_metas(run, cond, **versions), depth, sigma), list)
    except data.UsageError as e:  # several versions of a level, or a damaged meta.json
        return "trained versions" in str(e)


def find_levels(run, depth, cond, sigma=None, **versions):
    """The run folders of levels L … 1 of a depth-L model in ``run``, top-down. ``sigma`` (σ_L … σ_2, as
    train.py --sigma for the image level) picks among versions trained with different condition noise:
    level l was trained with its first L − l values; ``versions`` (read_metas) pick among versions of another
    size, condition path, text path, prediction or top-level width. When ``run`` lacks a level, the error names the folders
    beside it that hold the whole model (make demo trains into runs/reproduce-quick)."""
    if sigma is not None and len(sigma) != depth - 1:
        raise data.UsageError(f"--sigma takes {depth - 1} values (σ_{depth} … σ_2, top-down) for depth {depth}")
    metas = read_metas(run, cond, **versions)
    found = match_levels(metas, depth, sigma)
    if isinstance(found, list):
        return found
    elsewhere = [str(d) for d in sorted(Path(run).parent.glob("*")) if d.is_dir() and d != Path(run)
                 and holds_model(d, depth, cond, sigma, **versions)]
    if elsewhere:
        raise data.UsageError(f"level {found} of depth {depth} ({cond}) is not trained in {run}, but the whole model "
                              f"is in {' and '.join(elsewhere)}: pass --run-dir {elsewhere[0]}")
    data_name = metas[0]["data"] if metas else "glyphs"
    raise data.UsageError(f"level {found} of depth {depth} ({cond}) is not trained in {run}; train it with "
                          f"python train.py --level {found} --depth {depth} --data {data_name} --cond {cond}")


def load_level(meta, device, use_ema=True):
    """(denoiser in eval mode, its Diffusion) from a level's run folder."""
    model = load_denoiser(meta, Path(meta["dir"]) / "ckpt.pt", use_ema)
    return model.to(device).eval(), Diffusion(meta["schedule"], meta["T"], meta.get("prediction", "eps"))


# ----------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------

def level_eps(model, conds, sigmas, y, text, w, gamma, T, generator, precision="fp32"):
    """The network's output (ε or v) at (x_t, t) for one level on conditions noised as N(z, (t/T)^γ σ² I)
    (γ = inf: clean): plain when w = 0, else CFG; under bf16 autocast when ``precision`` is "bf16"."""
    def eps(x, t):
        noisy = [H.noise_sample(z, s, t, T, gamma, generator) for z, s in zip(conds, sigmas)]
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            if w == 0 or not model.has_conditions:
                return model(x, t, noisy, y, text).float()
            return model.forward_with_cfg(x, t, noisy, y, text, w).float()
    return eps


def switched(eps_high, eps_low, below):
    """One network function: ``eps_low`` at timesteps t < ``below``, ``eps_high`` at the others."""
    def eps(x, t):
        return eps_low(x, t) if int(t[0]) < below else eps_high(x, t)
    return eps


def condition_gamma(gamma, w):
    """γ of the condition noise: as given, else the paper's 0.3 under guidance and none (inf) without (Table 3)."""
    if gamma is not None:
        return gamma
    return 0.3 if w != 0 else math.inf


@torch.no_grad()
def sample_batch(levels, weights, n, args, device, generator, y=None, text=None, kept=(), finisher=None):
    """Generate one batch top-down; ``text`` holds each level's text input (level_texts), ``kept`` are fixed
    top latents (B, C, M, M); ``finisher`` (a depth-1 image level's model, --finish-below) takes the image level's
    steps below ``args.finish_below``. Returns the list of levels and the seconds spent per level."""
    zs, seconds = list(kept), []
    for k, (model, diffusion, meta) in enumerate(levels):
        start = time.time()
        if k >= len(kept):
            gamma = condition_gamma(args.gamma, weights[k])
            text_k = text[k] if text else None
            eps = level_eps(model, zs, meta["sigmas"], y, text_k, weights[k], gamma, diffusion.T, generator,
                            args.precision)
            if finisher is not None and k == len(levels) - 1:
                eps = switched(eps, level_eps(finisher, [], [], y, None, weights[k], gamma, diffusion.T, generator,
                                              args.precision), args.finish_below)
            clip = 1.0 if meta["target_image"] and meta["image_space"] == "pixels" else None
            zs.append(diffusion.sample(eps, (n, *meta["target"]), args.steps, args.sampler, args.eta, generator,
                                       clip=clip, device=device))
        seconds.append(time.time() - start)
    return zs, seconds


def level_texts(encoder, prompts, metas):
    """Each level's text input for ``prompts``, top-down: the text tower's token states (B, N_text, D_text), or
    CLIP's pooled embedding (B, D) where the level takes its caption through adaLN (train.py --text-path adaln)."""
    pooled = [m.get("text_path") == "adaln" for m in metas]
    states = {p: encoder.embed_text(prompts) if p else encoder.encode_text(prompts) for p in set(pooled)}
    return [states[p] for p in pooled]


def decode(z, vae, scale=H.VAE_SCALE):
    """Image level -> images in [-1, 1] (the SD-VAE decoder for VAE latents, scaled by the dataset's latent scale)."""
    return z.clamp(-1, 1) if vae is None else vae.decode(z / scale).sample.clamp(-1, 1)


def even_classes(n, num_classes):
    """Class ids of n class-conditional samples, evenly spread: n/num_classes of each (ADM and DiT's FID protocol
    draws 50 per class for 50,000 ImageNet samples), the first n mod num_classes classes one more. (n,) int64."""
    return torch.arange(n) % num_classes


def load_reference(spec, meta, image_size, n):
    """Reference images in [-1, 1]: an image file or glyph:CHAR, as a tensor (1, C, H, W); or data:NAME:SPLIT,
    as a Subset of ``n`` items spread evenly over that split, each resampled once (the hierarchy's oracle:
    how close the lower levels come to real images when the top levels are the images' own latents)."""
    channels = meta["target"][0] if meta["image_space"] == "pixels" else data.dataset_channels(meta.get("data", "imagenet"))
    if spec.startswith("data:"):
        name, split = data.parse_data_spec(spec)  # imagenet and coco are read from data/<name>
        ds = data.build_dataset(name, split, image_size)
        if n > len(ds):
            raise data.UsageError(f"--n {n} is more than the {len(ds)} images of {spec}")
        return Subset(ds, data.evenly_spaced(len(ds), n))
    if spec.startswith("glyph:"):
        for split in ("train", "test"):
            ds = data.build_dataset("glyphs", split, image_size)
            if spec[6:] in ds.chars:
                return ds[ds.chars.index(spec[6:])][0][None]
        raise data.UsageError(f"{spec[6:]!r} is not in the glyph set; pass a character from it or an image file")
    try:
        with Image.open(spec) as img:
            arr = data.center_crop_arr(img.convert("L" if channels == 1 else "RGB"), image_size)
    except (OSError, ValueError) as e:
        raise data.UsageError(f"cannot read reference image {spec} ({e})") from e
    x = torch.from_numpy(np.asarray(arr, dtype=np.float32) / 127.5 - 1)
    return (x[None] if x.dim() == 2 else x.permute(2, 0, 1))[None]


def reference_batch(refs, start, n):
    """References of samples start … start+n-1: the one reference (1, C, H, W) that all of them share, or
    the n items of a data split (n, C, H, W)."""
    if isinstance(refs, torch.Tensor):
        return refs
    return torch.stack([refs[i][0] for i in range(start, start + n)])


def save_labelled_grid(images, path, label):
    """The sample grid, with the prompt or class written above it when given."""
    data.save_grid(images, path, nrow=int(math.ceil(math.sqrt(len(images)))))
    if label:
        grid = Image.open(path).convert("RGB")
        out = Image.new("RGB", (grid.width, grid.height + 14), "white")
        out.paste(grid, (0, 14))
        font_path, index = data.default_font()  # Noto Sans CJK writes radicals (金); PIL's default font cannot
        font = ImageFont.truetype(font_path, 11, index=index) if font_path else None
        ImageDraw.Draw(out).text((2, 1), label[:grid.width // 6], fill="black", font=font)
        out.save(path)


def check_flags(args):
    """The checks that need no trained level: they run before anything is loaded."""
    for flag, low in (("--depth", 1), ("--n", 1), ("--batch", 1), ("--steps", 1), ("--gamma", 0),
                      ("--finish-below", 0)):
        data.check_range(flag, getattr(args, flag[2:].replace("-", "_")), low)
    data.check_range("--eta", args.eta, 0, 1)  # as Diffusion.sample takes it
    if args.reference and not 0 <= args.keep < args.depth:
        raise data.UsageError(f"--keep takes 0..{args.depth - 1} (the number of top latent levels kept)")
    if args.prompt is not None and args.cond != "text":
        raise data.UsageError(f"--prompt needs a text-conditional model (--cond text); this one is --cond {args.cond}")
    if args.finish_below and (args.cond == "text" or args.depth == 1):
        raise data.UsageError("--finish-below needs a depth > 1 and a class or unconditional model (not --cond text)")
    if args.class_id is not None and args.cond != "class":
        raise data.UsageError(f"--class needs a class-conditional model (--cond class); this one is --cond {args.cond}")
    cfg_weights(args.cfg, args.cond, args.depth)  # one weight, or one per level
    npz = output_path(args)
    if npz.exists() and not args.overwrite:
        raise data.UsageError(f"{npz} exists; pass --overwrite to replace it, or another --out")


def output_path(args):
    """Where the samples go: <out>/depth<L>-<cond>[-keep<K>].npz (the grid: the same name, .png)."""
    name = f"depth{args.depth}-{args.cond}" + (f"-keep{args.keep}" if args.reference else "")
    return Path(args.out) / f"{name}.npz"


def class_index(spec, meta):
    """The internal class id (0..K-1) that ``--class`` names: for glyphs the radical (金) or its Kangxi number
    (167), for other datasets the class index itself (ImageNet's 0..999)."""
    if meta["data"] == "glyphs":
        return data.radical_class(spec)
    classes = meta["num_classes"]
    if not spec.lstrip("-").isdigit() or not 0 <= int(spec) < classes:
        raise data.UsageError(f"--class {spec} is outside 0..{classes - 1} (the model's {classes} classes)")
    return int(spec)


def class_label(index, meta):
    """A grid's label for class ``index``: 'radical 金 (167)' for glyphs, 'class 3' otherwise."""
    return data.radical_name(index) if meta["data"] == "glyphs" else f"class {index}"


def check_levels(args, metas):
    """The checks against the trained levels: sampling steps."""
    T = min(m["T"] for m in metas)
    if args.steps > T:
        raise data.UsageError(f"--steps {args.steps} is more than the {T} diffusion steps the levels were trained with")


def finishing_level(args, image_meta):
    """The depth-1 image level of the run folder that --finish-below hands the last steps to: the same target,
    schedule and prediction as the image level it finishes."""
    (meta,) = find_levels(args.run, 1, args.cond, model=args.model, prediction=args.prediction)
    if [meta[k] for k in ("target", "schedule", "T", "prediction")] != \
            [image_meta[k] for k in ("target", "schedule", "T", "prediction")]:
        raise data.UsageError(f"--finish-below: the depth-1 level {meta['dir']} does not match the image level it "
                              f"would finish (target, schedule, T, prediction)")
    return meta


def main(args):
    check_flags(args)
    device = torch.device(args.device)
    metas = find_levels(args.run, args.depth, args.cond, args.sigma, model=args.model, cond_path=args.cond_path,
                        text_path=args.text_path, prediction=args.prediction, model_guidance=args.model_guidance,
                        top_channels=args.top_channels)
    check_levels(args, metas)
    class_id = class_index(args.class_id, metas[0]) if args.class_id is not None else None
    weights = cfg_weights(args.cfg, args.cond, args.depth, metas)
    levels = [(*load_level(m, device, not args.no_ema), m) for m in metas]
    finisher = load_level(finishing_level(args, metas[-1]), device, not args.no_ema)[0] if args.finish_below else None
    hier = H.locate_cache(metas[0], metas[0]["dir"], args.cache_dir)
    cache_args = argparse.Namespace(**{"encoder": "clip", **hier.meta["args"], "device": args.device,
                                       "text_encoder": metas[0].get("text_encoder")})
    vae = H.load_vae(cache_args.vae, device) if hier.meta["image_space"] == "sd-vae" else None
    if args.reference:  # its latents must come from the weights the levels were trained on
        H.refuse_other_weights(hier.root, hier.meta, cache_args, H.weights_digest(cache_args))
    encoder = H.make_encoder(cache_args, device) if args.reference else None
    text_encoder = H.make_text_encoder(cache_args, device) if args.cond == "text" else None
    if args.reference:
        refs = load_reference(args.reference, metas[-1], cache_args.image_size, args.n)
        ref_levels = H.meta_levels(metas[-1])[:args.keep]  # the latents the image level was trained on

    generator = torch.Generator(device).manual_seed(args.seed)
    captions = hier.captions("test")
    classes = even_classes(args.n, metas[0]["num_classes"]) if args.cond == "class" else None
    images, seconds = [], np.zeros(args.depth)
    for start in tqdm(range(0, args.n, args.batch), desc=f"sample depth {args.depth}", unit="batch"):
        n = min(args.batch, args.n - start)
        y = text = None
        if args.cond == "class":
            y = torch.full((n,), class_id, device=device) if class_id is not None else \
                classes[start:start + n].to(device)
        if args.cond == "text":
            prompts = [args.prompt] * n if args.prompt is not None else \
                [captions[(start + i) % len(captions)][0] for i in range(n)]
            text = level_texts(text_encoder, prompts, metas)
        kept = []
        if args.reference:
            x = reference_batch(refs, start, n).to(device)  # a shared reference is encoded once, not n times
            kept = [z.expand(n, *z.shape[1:]) for z in H.encode_image(hier, encoder, x, ref_levels, cache_args.min_crop, vae)]
        zs, secs = sample_batch(levels, weights, n, args, device, generator, y, text, kept, finisher)
        images.append(data.to_uint8(decode(zs[-1], vae, hier.vae_scale)))
        seconds += secs

    images = np.concatenate(images)                                                   # (N, H, W, C) uint8
    npz = output_path(args)
    out, name = npz.parent, npz.stem
    out.mkdir(parents=True, exist_ok=True)
    rgb = np.repeat(images, 3, -1) if images.shape[-1] == 1 else images
    data.save_npz(npz, arr_0=rgb)
    grid = images[:64]
    if args.reference and isinstance(refs, torch.Tensor):  # the reference, then its resamplings
        grid = np.concatenate([data.to_uint8(refs), grid[:63]])
    elif args.reference:                                  # each reference beside its resampling
        k = min(32, len(images))
        grid = np.stack([data.to_uint8(reference_batch(refs, 0, k)), images[:k]], 1).reshape(-1, *images.shape[1:])
    label = args.prompt or (class_label(class_id, metas[0]) if class_id is not None else "")
    save_labelled_grid(grid, out / f"{name}.png", label)
    for k, s in enumerate(seconds):
        print(f"level {args.depth - k}: {s:.1f}s")
    print(f"wrote {len(images)} samples to {out / name}.npz and a grid to {out / name}.png")
    return out / f"{name}.npz"


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=data.HelpFormatter)
    p.add_argument("--depth", type=int, default=5, help="number of levels L")
    p.add_argument("--run-dir", "--run", dest="run", default="runs/glyphs", help="folder of trained levels (train.py --run-dir)")
    p.add_argument("--cache-dir", default="cache",
                   help="where the latent caches are, when not found beside the run folder (train.py --cache-dir)")
    p.add_argument("--cond", choices=CONDS, default="none", help="which trained family to sample")
    p.add_argument("--model", default=None, help="denoiser size, when a level was trained at several sizes")
    p.add_argument("--sigma", type=float, nargs="+", default=None,
                   help="σ_L … σ_2 (top-down) the levels were trained with, when a level has several versions")
    p.add_argument("--cond-path", choices=COND_PATHS, default=None,
                   help="how the levels take their conditions (train.py --cond-path), when several versions exist")
    p.add_argument("--text-path", choices=TEXT_PATHS, default=None,
                   help="how the levels take their caption (train.py --text-path), when several versions exist")
    p.add_argument("--top-channels", type=int, default=None,
                   help="the top latent level's channels the levels were trained with (train.py --top-channels), "
                        "when several versions exist")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16 autocast of the denoisers (CUDA, or a CPU with native bf16 such as AMX; README, Speed)")
    p.add_argument("--prediction", choices=PREDICTIONS, default=None,
                   help="what the levels' networks predict (train.py --prediction), when several versions exist")
    p.add_argument("--model-guidance", type=float, default=None,
                   help="the model-guidance weight the levels were trained with (train.py --model-guidance; 0 = "
                        "none), when several versions exist; such levels sample with --cfg 0 unless --cfg is given")
    p.add_argument("--n", type=int, default=16, help="number of samples")
    p.add_argument("--batch", type=int, default=64, help="samples per batch")
    p.add_argument("--steps", type=int, default=50, help="sampling steps per level")
    p.add_argument("--sampler", choices=SAMPLERS, default="dpm++",
                   help="DPM-Solver++(2M) (Lu et al. 2022, the paper's), DDIM (Song et al. Eq. 12) or DDPM ancestral")
    p.add_argument("--eta", type=float, default=0.0,
                   help="--sampler ddim: DDIM η in [0, 1] (0: deterministic; 1: the DDPM posterior's noise)")
    p.add_argument("--cfg", type=float, nargs="+", default=None,
                   help="guidance weight, one for all levels or one per level top-down "
                        "(default: none 0.8; class 0.5 0.4 0.3 0.2 0.1; text 1.0); 0 = no guidance")
    p.add_argument("--gamma", type=float, default=None,
                   help="condition noise N(z, (t/T)^γ σ² I) at sampling, with or without guidance (inf: clean; "
                        "default: the paper's 0.3 under guidance, clean without, Table 3)")
    p.add_argument("--class", dest="class_id", default=None,
                   help="the class of a class-conditional model: for glyphs the radical (金) or its Kangxi number "
                        "(167); for other datasets the class index (0-based, ImageNet's 0..999); default: every "
                        "class equally often, as for FID")
    p.add_argument("--prompt", default=None, help="text for a text-conditional model")
    p.add_argument("--reference", default=None,
                   help="an image file or glyph:CHAR to resample (paper Fig. 1); data:NAME:SPLIT resamples --n "
                        "images of a dataset split, one sample each")
    p.add_argument("--keep", type=int, default=1, help="with --reference: top latent levels kept from it")
    p.add_argument("--no-ema", action="store_true", help="sample with the raw weights instead of the EMA")
    p.add_argument("--finish-below", type=int, default=0,
                   help="not in the paper, a diagnostic: the image level's steps at t below this are taken by the "
                        "depth-1 image level of the same run folder, which reads no latents (0: off)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same samples)")
    p.add_argument("--out", default="samples", help="output folder for the .png grid and the .npz")
    p.add_argument("--overwrite", action="store_true", help="replace the .npz and .png of an earlier run in --out")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device")
    return p


if __name__ == "__main__":
    data.run_main(main, get_parser().parse_args())
