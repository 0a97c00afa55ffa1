"""The main job: the paper's depth trend (Tables 1 and 6) on the embedded glyph set, end to end, offline.

glyph data -> glyph CLIP (the offline stand-in for the paper's pretrained encoder) -> latent cache ->
every level of each depth (levels shared between depths are trained once, as in paper §4.1) ->
cascaded sampling (DDIM with η = 1 in the unconditional presets, not the paper's DPM-Solver++: README) -> FID
against the held-out glyphs, without and with guidance (Table 1's two column groups; the quick preset leaves
guidance out to stay under 20 minutes) -> ``results/<preset>/results.md``
and sample grids. The full preset adds Table 6's 1* baseline and an oracle row: the deepest model with its top
latents taken from held-out glyphs; the sigma preset, on its levels, Table 1's σ_2 sweep (the image level retrained
with σ_2 ∈ {0, 0.5, 1}, the upper σ at the paper's unconditional values).
Every number it writes comes from this run; rerunning the same preset regenerates them (within noise:
CPU float reductions and thread timing aside, all randomness is seeded).

    python reproduce.py --preset quick     # depths 1 and 4, ~16 min on 2 CPU cores (make demo; README)
    python reproduce.py --preset full      # the README's results (see README for its wall time)
    python reproduce.py --preset sigma     # after full: Table 1's σ_2 sweep on its levels
    python reproduce.py --preset long      # depths 1 and 3 with 2x the image-level training
    python reproduce.py --preset quick-long  # quick's depths 1 and 3 with 2x the image-level training
    python reproduce.py --preset recon     # after quick: depth 5 at the paper's σ and at σ = 0, resamples (Fig. 4)
    python reproduce.py --preset cond      # class- and text-conditional depths 1 and 3: FID, prompt adherence
    python reproduce.py --preset gpu --defer-fid   # on a GPU: full's depths 1 and 3 at size S, batch 256, 3,000 steps
    python reproduce.py --preset gpu --finish      # then, where the FID weights are: FID and the results files

``--encoder mocov3 --pretrained FILE`` runs a preset on a MoCo-v3 ViT trained on the glyphs (train_encoder.py
--objective mocov3; the paper's ImageNet encoder) instead of the glyph CLIP: no CLIP is trained, the latent cache,
KNN row and levels are the ViT's, in their own run and results folders (``<preset>-mocov3``).
"""
import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

import autoencoder
import data
import evaluate
import hierarchy as H
import sample
import train
import train_encoder
from denoiser import COND_PATHS, SIZES, TEXT_PATHS, native_bf16
from diffusion import PREDICTIONS, SAMPLERS, cfg_weights, check_model_guidance

PENDING = "pending.json"  # what a --defer-fid run leaves for --finish: the sample files and everything but the FIDs
P_UNCOND = 0.1  # the paper's condition dropout (train.py --p-uncond); full, sigma, long and gpu use 0.5
# knn_random=False: no random-weights KNN row (a minute of embedding on 2 CPU cores; the full preset reports it)
QUICK = dict(clip_steps=30, model="XS", steps=800, latent_steps=800, batch=64, depths=(1, 4), n_samples=256,
             sample_steps=50, fid_ref=500, sigma_sweep=(), guided=False, oracle_keep=(3,), p_uncond=P_UNCOND,
             knn_random=False)
QUICK3 = dict(QUICK, depths=(1, 3), oracle_keep=(2,))  # the quick preset before it went to depth 4 (README)
PRESETS = {
    "quick": QUICK,
    # p_uncond 0.5 (not the paper's 0.1): at depth 3 never worse without guidance (the goal's measure), and far better
    # from 1,600 steps; with guidance at 1,000 steps the paper's 0.1 is better (README)
    "full": dict(clip_steps=500, model="XS", steps=1000, latent_steps=1000, batch=64, depths=(1, 2, 3),
                 n_samples=500, sample_steps=50, fid_ref=None, sigma_sweep=(), oracle_keep=(1, 2),
                 baseline="XS+", p_uncond=0.5),
    # Table 1's σ_2 sweep and Fig. 4's clean model (every σ = 0) on the full preset's encoder and levels
    "sigma": dict(clip_steps=500, clip_of="full", runs_of="full", model="XS", steps=1000, latent_steps=1000,
                  batch=64, depths=(1, 2, 3), n_samples=500, sample_steps=50, fid_ref=None,
                  sigma_sweep=(0.0, 0.5, 1.0), guided=False, clean=True, p_uncond=0.5),
    # the full preset's depths 1 and 3 with twice the image-level budget (same encoder, same latent levels)
    "long": dict(clip_steps=500, clip_of="full", model="XS", steps=2000, latent_steps=1000, batch=64, depths=(1, 3),
                 n_samples=500, sample_steps=50, fid_ref=None, sigma_sweep=(), p_uncond=0.5),
    # the quick preset with twice the image-level budget (its encoder; seeded with a copy of its run folder, only
    # the image levels' second 800 steps are trained: under the constant learning rate that equals 1,600 from scratch)
    "quick-long": dict(QUICK3, clip_of="quick", steps=1600),
    # Fig. 4's σ = 0: the quick preset's models (its encoder and run folder) plus the deepest model trained with
    # clean conditions (every σ = 0), its FID, and the held-out glyphs resampled from all their latents through it
    "recon": dict(QUICK, clip_of="quick", runs_of="quick", depths=(1, 5), oracle_keep=(4,), clean=True),
    # the full preset's depths 1 and 3 scaled up for a GPU (DiT-S, batch 256, 3,000 steps per level: 12x the samples
    # seen of full's, 1,000 samples per FID), with its own 1* (S+, about the GMACs of depth 3). Training takes about
    # 12 minutes on an H200 (S levels at 21-27 steps/s there); FID on the CPU (--defer-fid there, --finish elsewhere)
    "gpu": dict(clip_steps=500, model="S", steps=3000, latent_steps=3000, batch=256, depths=(1, 3), n_samples=1000,
                sample_steps=50, fid_ref=None, sigma_sweep=(), oracle_keep=(1, 2), baseline="S+", p_uncond=0.5),
    # class- and text-conditional models (paper §4: per-mode σ and guidance), FID and prompt adherence; at 1,000
    # steps per level the samples barely followed their prompt, at 2,500 they do (README)
    "cond": dict(clip_steps=500, clip_of="full", model="XS", steps=2500, latent_steps=2500, batch=64, depths=(1, 3),
                 n_samples=500, sample_steps=50, fid_ref=None, sigma_sweep=(), conds=("class", "text"), n_prompt=64,
                 p_uncond=P_UNCOND),
}
# what the conditional preset prompts with: radicals (class mode) and definitions (text mode, each the
# definition of glyphs of one radical: gold 金, water 水, tree 木, fire 火, fish 魚, horse 馬)
PROMPTS = {"class": ("金", "水", "木", "口", "艸", "鳥"), "text": ("gold", "water", "tree", "fire", "fish", "horse")}
# the unconditional presets' sampler: DDIM with η = 1 (the DDPM posterior's noise), not the paper's DPM-Solver++(2M);
# at the full preset every FID 8-14 lower, depth 3 / depth 1 0.93 against 0.97 and depth 3 ahead of the 1* (README)
PRESET_SAMPLER = ("ddim", 1.0)
CFG = 0.8  # the paper's unconditional guidance weight (constant over levels), with γ = 0.3 condition noise
IMAGE_SIZE = 32  # default glyph size: 8×8 = 64 tokens (patch 4 on pixels, 1 on the glyph VAE's 8×8×4): minutes on 2 cores
IMAGE_SPACES = ("pixels", "vae")  # the image level: pixels, or the glyph VAE's latents (autoencoder.py)
VAE_STEPS = 1000  # autoencoder.py's training steps for --image-space vae (about 6 min on 2 CPU cores)
ENCODER_NAMES = {"clip": "glyph CLIP", "mocov3": "MoCo-v3 ViT", "pixels": "pixel thumbnails"}
# train_encoder.py's MoCo-v3 flags for the glyph ViT on 2 CPU cores (README: MoCo-v3 encoder on glyphs, Your own images)
MOCOV3_RECIPE = "--steps 1000 --batch-size 128 --mlp-dim 1024 --lr 1e-3 --crop-min 0.85"


def step(title):
    print(f"\n=== {title} ===", flush=True)
    return time.time()


def default_sigmas(depth, cond="none"):
    """σ_L … σ_2 of a depth-L model of mode ``cond``: the paper's schedule, by latent grid (hierarchy.SIGMAS)."""
    return [H.sigma_for(2 ** k, cond) for k in range(depth - 1)]


def glyph_image_patch(args):
    """The glyph presets' image-level patch, passed to train.py as --image-patch: 64 tokens at any glyph size
    (pixels: size / 8; the glyph VAE's 8×8×4 latents: 1). train.image_patch's default (H/16) is the paper's rule for
    256 px images."""
    return args.image_size // 8 if args.image_space == "pixels" else 1


def hierarchy_argv(args):
    return ["--data", "glyphs", "--image-size", str(args.image_size), "--data-dir", args.data_dir,
            "--cache-dir", args.cache_dir, "--encoder", args.encoder, "--pretrained", encoder_weights(args),
            "--min-crop", str(args.min_crop), "--device", args.device] \
        + (["--image-space", "sd-vae", "--vae", args.vae] if args.image_space == "vae" else [])


def encoder_weights(args):
    """The frozen encoder's weights file: the glyph CLIP's (--clip) or the MoCo-v3 ViT's (--pretrained)."""
    return args.clip if args.encoder == "clip" else args.pretrained


def resolve_encoder(args, cfg):
    """Check the encoder flags and fill their defaults in place, before anything is built: the glyph CLIP's file
    (trained when missing) or the MoCo-v3 ViT's (which must exist: train_encoder.py makes it)."""
    if args.encoder == "clip":
        if args.pretrained is not None:
            raise data.UsageError("--pretrained is the MoCo-v3 encoder's weights (--encoder mocov3); "
                                  "the glyph CLIP's are --clip")
        args.clip = args.clip or f"checkpoints/glyph-clip-{cfg.get('clip_of', args.preset)}.pt"
        return
    if args.clip is not None:
        raise data.UsageError(f"--clip is the glyph CLIP's weights; --encoder {args.encoder} takes none of them")
    if "text" in cfg.get("conds", ()):
        raise data.UsageError(f"--preset {args.preset} needs --encoder clip: its text mode reads the CLIP's text tower")
    if args.encoder == "pixels":
        if args.pretrained is not None:
            raise data.UsageError("--encoder pixels has no weights; drop --pretrained")
        args.pretrained = "none"
        return
    args.pretrained = args.pretrained or H.trained_encoder_path("glyphs")
    if not Path(args.pretrained).exists():
        raise data.UsageError(f"MoCo-v3 weights {args.pretrained} not found; train them with python train_encoder.py "
                              f"--objective mocov3 --train --data glyphs {MOCOV3_RECIPE} --out {args.pretrained}")


def preset_config(args):
    """The preset's settings as the flags change them: --baseline, --depths, --model, --p-uncond, --steps."""
    cfg = PRESETS[args.preset] | ({"baseline": args.baseline} if args.baseline else {})
    cfg |= {"p_uncond": args.p_uncond} if args.p_uncond is not None else {}
    if args.depths:  # the oracle then keeps all latents of the deepest model
        cfg |= {"depths": tuple(sorted(set(args.depths))), "oracle_keep": (max(args.depths) - 1,)}
    cfg |= {"model": args.model} if args.model else {}
    return cfg | ({"steps": args.steps, "latent_steps": args.steps} if args.steps else {})


def main(args):
    cfg = preset_config(args)
    args.given = given_flags(args)  # for results.md's command
    if args.baseline and (args.baseline not in SIZES or "conds" in cfg):
        raise data.UsageError(f"--baseline takes a denoiser size ({', '.join(SIZES)}) and an unconditional preset")
    if args.steps is not None and args.steps < 1:
        raise data.UsageError(f"--steps takes a positive number of training steps per level; got {args.steps}")
    if args.depths and (min(args.depths) != 1 or max(args.depths) > 5):
        raise data.UsageError(f"--depths takes depths from 1 to 5, including 1 (the ratios divide by depth 1); "
                              f"got {data.as_typed(args.depths)}")
    if args.defer_fid and (args.finish or cfg.get("conds")):
        raise data.UsageError("--defer-fid is for an unconditional preset's sampling run; --finish then scores it")
    check_sampler(args, cfg)
    data.check_range("--p-uncond", cfg["p_uncond"], 0, 1)
    check_model_guidance(args.model_guidance, cfg["p_uncond"])
    data.check_range("--min-crop", args.min_crop, 1)
    data.check_range("--top-channels", args.top_channels, 1)  # its upper bound, the encoder's width, comes with the cache
    resolve_encoder(args, cfg)
    if args.vae is not None and args.image_space != "vae":
        raise data.UsageError("--vae is the glyph VAE's folder for --image-space vae")
    if args.image_size != IMAGE_SIZE and args.image_space == "vae":
        raise data.UsageError(f"--image-size {args.image_size} runs on pixels; the glyph VAE is trained at {IMAGE_SIZE} px")
    if args.image_space == "vae":
        args.vae = args.vae or f"checkpoints/glyph-vae-{cfg.get('clip_of', args.preset)}"
    out, runs = folders(args, cfg)
    if args.finish:
        return finish(args, cfg, out)
    args.precision = ("bf16" if native_bf16(args.device) else "fp32") if args.precision == "auto" else args.precision
    out.mkdir(parents=True, exist_ok=True)
    timings, started = {}, time.time()

    t = step("glyph data")
    train_set = data.build_dataset("glyphs", "train", args.image_size, data_dir=args.data_dir)
    test_set = data.build_dataset("glyphs", "test", args.image_size, data_dir=args.data_dir)
    print(f"{len(train_set)} train, {len(test_set)} held-out glyphs")
    timings["data"] = time.time() - t

    encoder_argv = ["--objective", args.encoder, "--image-size", str(args.image_size), "--data-dir", args.data_dir,
                    "--device", args.device]
    if args.encoder == "clip":
        t = step("glyph CLIP")
        if not Path(args.clip).exists():  # its KNN report comes after the latent cache, which embeds the same glyphs
            train_encoder.main(encoder_argv + ["--train", "--skip-knn", "--steps", str(cfg["clip_steps"]),
                                               "--out", args.clip, "--precision", args.precision])
        timings["clip"] = time.time() - t
    if args.image_space == "vae":
        t = step("glyph VAE")
        if not Path(args.vae).exists():  # an interrupted training run continues where it stopped
            autoencoder.main(["--data", "glyphs", "--image-size", str(args.image_size), "--data-dir", args.data_dir,
                              "--steps", str(VAE_STEPS), "--out", args.vae, "--device", args.device,
                              "--precision", args.precision, "--resume"])
        timings["vae"] = time.time() - t

    t = step("latent cache")
    hargs = H.resolve_defaults(H.get_parser().parse_args(hierarchy_argv(args) + ["--depth", str(max(cfg["depths"]))]))
    hier = H.build_cache(hargs)
    levels = hier.levels(max(cfg["depths"]), glyph_image_patch(args), args.top_channels)
    kept = {lv.name: hier.reduction(lv).kept for lv in levels if not lv.image}
    timings["cache"] = time.time() - t
    if cfg.get("conds"):  # its results carry no KNN row
        return conditional(args, cfg, out, runs, timings, started)

    # the trained row reads the cache's embeddings; the random row its own cache (pixels: nothing trained, no report)
    knn = []
    if args.encoder != "pixels":
        t = step(f"{ENCODER_NAMES[args.encoder]}: KNN report")
        knn = train_encoder.main(encoder_argv + ["--knn", "--pretrained", encoder_weights(args),
                                                 "--latent-cache", str(hier.root), "--cache-dir", args.cache_dir]
                                 + ([] if cfg.get("knn_random", True) else ["--no-random-row"]))
        timings["knn"] = time.time() - t

    t = step("training")
    before = {p: p.stat().st_mtime for p in runs.glob("*/ckpt.pt")}
    used = [train_level(args, cfg, runs, depth, level, sigmas, cfg["model"]) for depth, level, sigmas in training_plan(cfg)]
    if cfg.get("baseline"):  # Table 6's L = 1*: one level as large as the hierarchy, same steps and batch
        used.append(train_level(args, cfg, runs, 1, 1, [], cfg["baseline"]))
    reused = reused_levels(before, used)
    timings["train"] = time.time() - t

    t = step("sampling")
    samples = sample_all(args, cfg, runs, out)
    timings["sample"] = time.time() - t
    state = {"precision": args.precision, "n_train": len(train_set), "n_test": len(test_set), "knn": knn,
             "kept": kept, "reused": reused, "timings": timings, "wall_s": time.time() - started, "samples": samples}
    if args.defer_fid:  # what ran where, for results.md, and the sampler --finish must be given again
        state |= {"command": command_line(args), "machine": data.machine(args.device),
                  "sampler": sampler_of(args, cfg)}
        (out / PENDING).write_text(json.dumps(state, indent=1))
        print(f"\nsamples written, FID deferred: {out / PENDING} lists them; score them (on any machine, with the "
              f"samples at the same paths) with\n  {command_line(args).replace(' --defer-fid', '')} --finish")
        return
    score(args, cfg, out, state, test_set)


def sample_all(args, cfg, runs, out):
    """Every model's samples (sample.py, --sampler), as .npz paths: {"fid": [(depth, σ_L … σ_2, guidance w,
    npz)], "baseline": Table 6's 1* or None, "oracle": [(σ_L … σ_2, top levels kept, npz)]}. The oracle is the
    deepest model given the top latents of held-out glyphs; with all of them (keep = L - 1) the paired pixel error
    to the glyphs says how much the image level takes from its conditions."""
    draw = lambda depth, sigmas, w, grids, model=cfg["model"], extra=(): str(  # noqa: E731
        draw_samples(runs, depth, sigmas, w, cfg, grids, args, model, extra))
    fid, samples_dir = [], runs / "samples" / sampler_tag(args, cfg).lstrip("-")
    for depth, sigmas in models(cfg):
        default = sigmas == default_sigmas(depth)
        for w in (0.0, CFG) if cfg.get("guided", True) and depth > 1 and default else (0.0,):
            name = f"sigma{'-'.join(f'{s:g}' for s in sigmas)}-w{w:g}"
            grids = out if w == 0 and default else samples_dir / name  # the README's grids go to out
            fid.append((depth, sigmas, w, draw(depth, sigmas, w, grids)))
    baseline = draw(1, [], 0.0, samples_dir / "baseline", cfg["baseline"]) if cfg.get("baseline") else None
    depth, oracle = max(cfg["depths"]), []
    for sigmas in [default_sigmas(depth)] + ([clean_sigmas(depth)] if cfg.get("clean") else []):
        for keep in cfg.get("oracle_keep", ()) if sigmas == default_sigmas(depth) else [depth - 1]:
            oracle.append((sigmas, keep, draw(depth, sigmas, 0.0, out / f"oracle-{'-'.join(map(str, sigmas))}",
                                              extra=["--reference", "data:glyphs:test", "--keep", str(keep)])))
    return {"fid": fid, "baseline": baseline, "oracle": oracle}


def held_out_stats(args, cfg):
    """FID statistics (mu, sigma) of the preset's held-out glyphs: all of them, or ``fid_ref`` spread evenly
    over them."""
    return evaluate.dataset_stats("glyphs", "test", args.image_size, data_dir=args.data_dir, max_n=cfg["fid_ref"],
                                  device=args.device)


def score(args, cfg, out, state, test_set):
    """FID of every sample set of ``state["samples"]`` against the held-out glyphs, the oracle's paired pixel
    error, and the results files."""
    t = step("FID")
    ref = held_out_stats(args, cfg)
    samples, fids = state["samples"], {}  # (depth, σ_L … σ_2, guidance weight) -> FID
    images = {npz: np.load(npz)["arr_0"] for npz in sample_files(samples)}  # each file read once
    fid_of = lambda npz: evaluate.fid_against(images[npz], ref, args.device)  # noqa: E731
    for depth, sigmas, w, npz in samples["fid"]:
        fids[depth, tuple(sigmas), w] = fid_of(npz)
        print(f"depth {depth}, σ {sigmas}, w {w}: FID {fids[depth, tuple(sigmas), w]:.2f}")
    baseline = fid_of(samples["baseline"]) if samples["baseline"] else None
    refs = reference_images(test_set, cfg["n_samples"])
    mse = lambda npz: evaluate.paired_mse(images[npz], refs)  # noqa: E731
    unconditional = mse(next(npz for depth, _, w, npz in samples["fid"] if depth == 1 and w == 0))
    oracle = {(tuple(sigmas), keep): (fid_of(npz), mse(npz)) for sigmas, keep, npz in samples["oracle"]}
    timings = state["timings"] | {"fid": time.time() - t}
    write_results(out, args, cfg, state["n_train"], state["n_test"], state["knn"], state["kept"], fids, oracle,
                  state["reused"], timings, state["wall_s"] + timings["fid"], baseline, unconditional,
                  command=state.get("command"), machine=state.get("machine"))


def sample_files(samples):
    """The .npz paths of sample_all's ``samples``, each once."""
    paths = [f[-1] for f in samples["fid"]] + [samples["baseline"]] + [o[-1] for o in samples["oracle"]]
    return list(dict.fromkeys(p for p in paths if p))


def finish(args, cfg, out):
    """--finish: the FID step of a --defer-fid run (its samples brought to this machine), then the results files."""
    pending = out / PENDING
    if not pending.exists():
        raise data.UsageError(f"--finish scores the samples of a --defer-fid run with the same flags; "
                              f"{pending} not found")
    state = json.loads(pending.read_text())
    missing = [npz for npz in sample_files(state["samples"]) if not Path(npz).exists()]
    if missing:
        raise data.UsageError(f"--finish: {len(missing)} sample files of {pending} not found, e.g. {missing[0]}")
    drawn = tuple(state.get("sampler", ("dpm++", 0.0)))  # a run without the key: DPM-Solver++, the default then
    if drawn != sampler_of(args, cfg):
        raise data.UsageError(f"--finish: the samples of {pending} were drawn with --sampler {drawn[0]}"
                              + (f" --eta {drawn[1]:g}" if drawn[0] == "ddim" else "") + "; pass the same")
    args.precision = state["precision"]
    test_set = data.build_dataset("glyphs", "test", args.image_size, data_dir=args.data_dir)
    state["machine"] += f"; FID afterwards (--finish) on {data.machine(args.device)}"
    score(args, cfg, out, state, test_set)


def folders(args, cfg):
    """(results folder, run folder) of a run: --out and --runs, else named after the preset, with the encoder, the
    image space, the smallest crop, the top level's channels, the glyph size, p_uncond and model guidance where they
    are not the preset's, so that levels trained otherwise never share a folder."""
    suffix = ("" if args.encoder == "clip" else f"-{args.encoder}") + ("" if args.image_space == "pixels" else "-vae") \
        + ("" if args.min_crop == H.MIN_CROP else f"-crop{args.min_crop}") \
        + ("" if args.top_channels is None else f"-c{args.top_channels}") \
        + ("" if args.image_size == IMAGE_SIZE else f"-{args.image_size}px") \
        + ("" if cfg["p_uncond"] == PRESETS[args.preset]["p_uncond"] else f"-p{cfg['p_uncond']:g}") \
        + (f"-mg{args.model_guidance:g}" if args.model_guidance else "")
    return (Path(args.out or f"results/{args.preset}{suffix}{sampler_tag(args, cfg)}"),
            Path(args.runs or f"runs/reproduce-{cfg.get('runs_of', args.preset)}{suffix}"))


def check_sampler(args, cfg):
    """UsageError unless --eta goes with ddim (and is in [0, 1], as Diffusion.sample takes it), and the preset is
    unconditional where the sampler is not DPM-Solver++: before any training, not when sampling starts."""
    if args.eta is not None:
        data.check_range("--eta", args.eta, 0, 1)
    if cfg.get("conds") and args.sampler not in (None, "dpm++"):
        raise data.UsageError("--sampler is for the unconditional presets; preset cond samples with DPM-Solver++")
    sampler = sampler_of(args, cfg)[0]
    if args.eta is not None and sampler != "ddim":
        raise data.UsageError(f"--eta is DDIM's η; pass --sampler ddim with it (got --sampler {sampler})")


def preset_sampler(cfg):
    """(sampler, η) a preset samples with: PRESET_SAMPLER, or DPM-Solver++ for preset cond."""
    return ("dpm++", 0.0) if cfg.get("conds") else PRESET_SAMPLER


def sampler_of(args, cfg):
    """(sampler, η) of a run: --sampler and --eta, else the preset's (η only for DDIM)."""
    sampler = args.sampler or preset_sampler(cfg)[0]
    return sampler, ((PRESET_SAMPLER[1] if args.eta is None else args.eta) if sampler == "ddim" else 0.0)


def sampler_tag(args, cfg):
    """"" for the preset's own sampler, else "-dpm++", "-ddim-eta0.5" and the like: the results folder of a run
    sampled otherwise, and its samples' sub-folder in the run folder (the trained levels are the same)."""
    sampler, eta = sampler_of(args, cfg)
    return "" if (sampler, eta) == preset_sampler(cfg) else f"-{sampler}" + (f"-eta{eta:g}" if sampler == "ddim" else "")


def sampler_name(args, cfg):
    """The sampler as results.md names it."""
    sampler, eta = sampler_of(args, cfg)
    return {"dpm++": "DPM-Solver++(2M)", "ddim": f"DDIM η = {eta:g}", "ddpm": "DDPM ancestral"}[sampler] \
        + f", {cfg['sample_steps']} steps per level"


def version_argv(args):
    """--top-channels and --model-guidance for train.py and sample.py, where the run narrows the latent levels or
    trains them with model guidance (sample.py then picks those versions)."""
    return ([] if args.top_channels is None else ["--top-channels", str(args.top_channels)]) \
        + ["--model-guidance", f"{args.model_guidance:g}"]


def train_level(args, cfg, runs, depth, level, sigmas, model, cond="none"):
    """Train (or reuse) one level of a depth-``depth`` model of mode ``cond`` with condition noise ``sigmas``; the
    path of its checkpoint."""
    steps = cfg["steps"] if level == 1 else cfg["latent_steps"]
    return train.train(train.get_parser().parse_args(hierarchy_argv(args) + [
        "--level", str(level), "--depth", str(depth), "--model", model, "--image-patch", str(glyph_image_patch(args)),
        "--steps", str(steps), "--batch-size", str(cfg["batch"]), "--warmup", "100", "--lr", "1e-3",
        "--ema", "0.999", "--log-every", "50", "--ckpt-every", "500", "--run-dir", str(runs), "--resume",
        "--cond-path", args.cond_path, "--cond", cond, "--text-path", args.text_path, "--prediction", args.prediction,
        "--precision", args.precision, "--p-uncond", str(cfg["p_uncond"])]
        + (["--sigma", *map(str, sigmas[:depth - level])] if level < depth else [])
        + version_argv(args)))


def reused_levels(before, used):
    """The run folders' names of the levels this run used (``used``: checkpoint paths) that an earlier run had
    trained (``before``: checkpoint path -> modification time before training) and this one left unchanged."""
    return sorted({p.parent.name for p in used if p in before and p.stat().st_mtime == before[p]})


def reference_images(test_set, n):
    """The ``n`` held-out glyphs that ``sample.py --reference data:glyphs:test --n n`` resamples, as its .npz
    stores them: uint8 (n, H, W, 3)."""
    return np.repeat(data.evenly_spaced_images(test_set, n), 3, -1)


def clean_sigmas(depth):
    """σ_L … σ_2 of Fig. 4's model: every level trained on clean conditions."""
    return [0.0] * (depth - 1)


def models(cfg):
    """(depth, σ_L … σ_2) of every model the preset trains: each depth at the paper's σ, then the σ_2 sweep, then
    (``clean``) the deepest model with every level at σ = 0; each once."""
    runs = [(d, default_sigmas(d)) for d in cfg["depths"]]
    runs += [(d, default_sigmas(d)[:-1] + [s]) for d in cfg["depths"] if d > 1 for s in cfg["sigma_sweep"]]
    runs += [(max(cfg["depths"]), clean_sigmas(max(cfg["depths"])))] if cfg.get("clean") else []
    return [r for i, r in enumerate(runs) if r not in runs[:i]]


def training_plan(cfg):
    """(depth, level, σ_L … σ_2) of every level to train, top-down: all levels of each depth at the paper's σ and
    of the clean model, the image level alone for the σ_2 sweep. A level that two models share trains once (train.py
    --resume finds it done)."""
    return [(depth, level, sigmas) for depth, sigmas in models(cfg)
            for level in (range(depth, 0, -1) if sigmas in (default_sigmas(depth), clean_sigmas(depth)) else [1])]


def draw_samples(runs, depth, sigmas, w, cfg, out, args, model, extra=()):
    """The .npz of ``n_samples`` cascaded samples of one model (--sampler, guidance w)."""
    sampler, eta = sampler_of(args, cfg)
    return sample.main(sample.get_parser().parse_args([
        "--depth", str(depth), "--run-dir", str(runs), "--n", str(cfg["n_samples"]), "--batch", "128",
        "--steps", str(cfg["sample_steps"]), "--cfg", str(w), "--out", str(out), "--device", args.device,
        "--overwrite", "--model", model, "--cond-path", args.cond_path, "--prediction", args.prediction,
        "--precision", args.precision, "--sampler", sampler, "--eta", str(eta)]
        + (["--sigma", *map(str, sigmas)] if sigmas else []) + version_argv(args) + list(extra)))


def given_flags(args):
    """The flags given another value than their default, before main fills in those that depend on the preset
    (the device is named beside the command, with the machine)."""
    parser = get_parser()
    return [k for k, v in vars(args).items() if v != parser.get_default(k) and k not in ("preset", "device", "finish")]


def command_line(args):
    """The reproduce.py command of this run: the preset and every flag of ``args.given`` (given_flags)."""
    flag = lambda k, v: f"--{k.replace('_', '-')}" + ("" if v is True else f" {data.as_typed(v)}")  # noqa: E731
    return " ".join(["python reproduce.py --preset", args.preset] + [flag(k, getattr(args, k)) for k in args.given])


def write_results(out, args, cfg, n_train, n_test, knn, kept, fids, oracle, reused, timings, total, baseline=None,
                  unconditional=None, command=None, machine=None):
    """results.md (the tables the README quotes) and results.json from one run (``command`` and ``machine``: what
    ran where, by default this command on this machine)."""
    command, machine = command or command_line(args), machine or data.machine(args.device)
    sampler, eta = sampler_of(args, cfg)
    layout = {"vae": "glyphs-vae", "pixels": "glyphs" if args.image_size == IMAGE_SIZE else f"glyphs-{args.image_size}"}[
        args.image_space]
    gmacs = {d: sum(g for *_, g in evaluate.cost_table(cfg["model"], layout, [d], args.cond_path, args.top_channels))
             for d in cfg["depths"]}
    fmt = lambda key: f"{fids[key]:.2f}" if key in fids else "—"  # noqa: E731
    lines = [f"# Glyph reproduction, preset `{args.preset}`", "",
             f"Command: `{command}` — machine: {machine}, {args.precision} — "
             f"wall time {total / 60:.1f} min ({', '.join(f'{k} {v / 60:.1f}' for k, v in timings.items())} min)"
             + (f"; reused, already trained by an earlier run: {', '.join(reused)}" if reused else "") + ".", "",
             f"Data: {n_train} training glyphs, {n_test} held out, {args.image_size} px. Encoder: "
             f"{ENCODER_NAMES[args.encoder]} ({encoder_weights(args)}). Image level: "
             + ("pixels" if args.image_space == "pixels" else f"the 8×8×4 latents of the glyph VAE {args.vae}")
             + f". Denoisers: size {cfg['model']}, "
             f"{cfg['steps']} steps per level at batch {cfg['batch']}, conditions dropped with p_uncond "
             f"{cfg['p_uncond']:g}" + (f", model guidance w = {args.model_guidance:g}" if args.model_guidance else "")
             + f"; {sampler_name(args, cfg)}. FID: {cfg['n_samples']} "
             f"samples per model against "
             f"{cfg['fid_ref'] or n_test} held-out glyphs (FID Inception, pool3). σ_L … σ_2 = the paper's "
             f"unconditional schedule ({', '.join(f'{default_sigmas(d)}' for d in cfg['depths'] if d > 1)}).", "",
             f"| depth L | forward GMACs per image (all levels) | FID ↓, no guidance | FID ↓, guidance w = {CFG}, γ = 0.3 |",
             "|---|---|---|---|"]
    lines += [f"| {d} | {gmacs[d]:.3f} | {fmt((d, tuple(default_sigmas(d)), 0.0))} | "
              f"{fmt((d, tuple(default_sigmas(d)), CFG))} |" for d in cfg["depths"]]
    depth, deepest = max(cfg["depths"]), fids[max(cfg["depths"]), tuple(default_sigmas(max(cfg["depths"]))), 0.0]
    ratios = {f"depth{depth}/depth1": deepest / fids[1, (), 0.0]}
    if baseline is not None:  # Table 6's 1*: one level of about the deepest model's forward GMACs
        ratios[f"depth{depth}/1*"] = deepest / baseline
        gmacs_1star = sum(g for *_, g in evaluate.cost_table(cfg["baseline"], layout, [1]))
        lines += [f"| 1* ({cfg['baseline']}) | {gmacs_1star:.3f} | {baseline:.2f} | — |"]
    lines += ["", "FID ratios, no guidance: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items())]
    if cfg["sigma_sweep"]:
        lines += ["", "σ_2 (the noise on the image level's parent latent) as in Table 1, no guidance; "
                  "* = the paper's value:", "",
                  "| depth L | σ_L … σ_3 | " + " | ".join(f"σ_2 = {s:g}" for s in cfg["sigma_sweep"]) + " |",
                  "|---|---|" + "---|" * len(cfg["sigma_sweep"])]
        for d in (d for d in cfg["depths"] if d > 1):
            top, default = default_sigmas(d)[:-1], default_sigmas(d)[-1]
            cells = [fmt((d, tuple(top + [s]), 0.0)) + ("*" if s == default else "") for s in cfg["sigma_sweep"]]
            lines.append(f"| {d} | {', '.join(f'{s:g}' for s in top) or '—'} | " + " | ".join(cells) + " |")
    if cfg.get("clean"):  # Fig. 4's model, in the σ sweep's table too where the sweep has it
        clean = fids[depth, tuple(clean_sigmas(depth)), 0.0]
        lines += ["", f"Depth {depth} with every level trained on clean conditions (σ = 0), no guidance: "
                  f"FID {clean:.2f}, {clean / fids[1, (), 0.0]:.3f} × depth 1."]
    if oracle:
        lines += ["", f"The oracle: depth {depth} given the top latents of {cfg['n_samples']} held-out glyphs "
                  f"(`sample.py --reference data:glyphs:test --keep K`), the lower levels sampled, no guidance. "
                  f"Paired MSE: mean squared pixel error ([0, 1] scale) of each resample to its own glyph; "
                  f"unconditional (depth-1) samples paired with the same glyphs: {unconditional:.4f}.", "",
                  "| σ_L … σ_2 trained with | top levels kept | FID ↓ | paired MSE ↓ |", "|---|---|---|---|"]
        lines += [f"| {', '.join(f'{s:g}' for s in sig)} | {', '.join(f'z_{depth - i}' for i in range(keep))} | "
                  f"{fid:.2f} | {mse:.4f} |" for (sig, keep), (fid, mse) in oracle.items()]
    if knn:
        lines += ["", f"{ENCODER_NAMES[args.encoder]}, KNN radical accuracy (K = 20) on the held-out glyphs:", "",
                  "| weights | top-1 | top-5 |", "|---|---|---|"]
        lines += [f"| {name} | {top1:.3f} | {top5:.3f} |" for name, top1, top5 in knn]
    lines += ["", "Variance kept by each level's SVD: " + ", ".join(f"{k} {v:.2f}" for k, v in kept.items()), ""]
    lines += [f"![depth {d}](depth{d}-none.png)" for d in cfg["depths"]]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({
        "fid": [{"depth": d, "sigmas": list(sig), "cfg": w, "fid": f} for (d, sig, w), f in fids.items()],
        "ratios": ratios, "baseline_1star": baseline, "unconditional_mse": unconditional,
        "oracle": [{"sigmas": list(sig), "keep": keep, "fid": fid, "mse": mse} for (sig, keep), (fid, mse) in oracle.items()],
        "encoder": args.encoder, "encoder_weights": encoder_weights(args), "image_space": args.image_space,
        "cond_path": args.cond_path, "prediction": args.prediction, "precision": args.precision, "gmacs": gmacs,
        "p_uncond": cfg["p_uncond"], "top_channels": args.top_channels, "model_guidance": args.model_guidance,
        "sampler": sampler, "eta": eta, "knn": knn, "reused": reused,
        "timings_s": timings, "machine": machine},
        indent=1))
    print("\n" + "\n".join(lines))


# ----------------------------------------------------------------------------------------------------
# The conditional preset: class- and text-conditional models, FID and prompt adherence
# ----------------------------------------------------------------------------------------------------

def cond_models(cfg):
    """(mode, depth, σ_L … σ_2) of every conditional model: each mode at each depth with its paper σ."""
    return [(cond, d, default_sigmas(d, cond)) for cond in cfg["conds"] for d in cfg["depths"]]


def conditional(args, cfg, out, runs, timings, started):
    """Train every level of cond_models, then per model and guidance (none, the mode's paper default):
    FID of ``n_samples`` samples (sample.py's random classes / held-out definitions) against the held-out
    glyphs, and the adherence of ``n_prompt`` samples per prompt of PROMPTS (evaluate.py adherence)."""
    t = step("training")
    for cond, depth, sigmas in cond_models(cfg):
        for level in range(depth, 0, -1):
            train_level(args, cfg, runs, depth, level, sigmas, cfg["model"], cond)
    timings["train"] = time.time() - t

    t = step("radical classifier")
    classifier, accuracy = evaluate.radical_classifier(args.data_dir)
    targets = prompt_targets(data.glyph_definitions(args.data_dir))
    print(f"held-out accuracy {accuracy:.3f}")
    timings["classifier"] = time.time() - t

    t = step("sampling, FID and adherence")
    ref = held_out_stats(args, cfg)
    fids, shares = {}, {}  # (mode, depth, guided) -> FID; (mode, depth, guided, prompt) -> adherence
    for cond, depth, sigmas in cond_models(cfg):
        for guided in (False, True):
            key = cond, depth, guided
            npz = sample_cond(args, cfg, runs, key, sigmas, cfg["n_samples"], runs / "samples" / slug(key))
            fids[key] = evaluate.fid_against(np.load(npz)["arr_0"], ref, args.device)
            for prompt in PROMPTS[cond]:
                folder = runs / "samples" / slug(key, prompt)
                npz = sample_cond(args, cfg, runs, key, sigmas, cfg["n_prompt"], folder, prompt)
                shares[(*key, prompt)] = evaluate.adherence(
                    evaluate.predict_radicals(classifier, np.load(npz)["arr_0"]), targets[cond, prompt])
                if depth == max(cfg["depths"]) and guided:  # the README's grids
                    shutil.copy(npz.with_suffix(".png"), out / f"{slug(key, prompt)}.png")
            print(f"{cond}, depth {depth}, guided {guided}: FID {fids[key]:.2f}, adherence "
                  + ", ".join(f"{p} {shares[(*key, p)]:.2f}" for p in PROMPTS[cond]))
    timings["sample+fid"] = time.time() - t
    write_cond_results(out, args, cfg, fids, shares, targets, accuracy, timings, time.time() - started)


def prompt_targets(glyphs):
    """{(mode, prompt): the class it asks for} for every prompt of PROMPTS; ``glyphs`` = (chars, definitions,
    classes) of the glyph set, which a text prompt's radical is read from (evaluate.prompt_radical)."""
    targets = {("class", p): data.radical_class(p) for p in PROMPTS["class"]}
    return targets | {("text", p): evaluate.prompt_radical(p, *glyphs) for p in PROMPTS["text"]}


def slug(key, prompt=None):
    """Folder / file name of a model's samples: class-depth3-cfg, text-depth1-nocfg-gold, class-depth3-cfg-167."""
    cond, depth, guided = key
    name = f"{cond}-depth{depth}-{'cfg' if guided else 'nocfg'}"
    if prompt is None:
        return name
    return f"{name}-{data.radical_class(prompt) + 1}" if cond == "class" else f"{name}-{prompt.replace(' ', '_')}"


def sample_args(args, cfg, runs, key, sigmas, n, out, prompt=None):
    """sample.py's flags for ``n`` samples of one model, unguided or with the mode's paper guidance
    (diffusion.CFG_DEFAULTS, γ = 0.3), prompted by a radical or a definition, or else random classes / held-out
    definitions."""
    cond, depth, guided = key
    prompted = ["--class" if cond == "class" else "--prompt", prompt] if prompt is not None else []
    return ["--depth", str(depth), "--run-dir", str(runs), "--cond", cond, "--n", str(n), "--batch", "128",
            "--steps", str(cfg["sample_steps"]), "--out", str(out), "--device", args.device, "--overwrite",
            "--model", cfg["model"], "--cond-path", args.cond_path, "--prediction", args.prediction,
        "--precision", args.precision] + ([] if guided else ["--cfg", "0"]) \
        + (["--sigma", *map(str, sigmas)] if sigmas else []) + prompted \
        + (["--text-path", args.text_path] if cond == "text" else [])


def sample_cond(args, cfg, runs, key, sigmas, n, out, prompt=None):
    """Sample one model (sample.py); returns the .npz."""
    return sample.main(sample.get_parser().parse_args(sample_args(args, cfg, runs, key, sigmas, n, out, prompt)))


def write_cond_results(out, args, cfg, fids, shares, targets, accuracy, timings, total):
    """results.md and results.json of the conditional preset: per mode, FID and mean adherence by depth and
    guidance, then the adherence of each prompt."""
    deep = max(cfg["depths"])
    lines = [f"# Glyph reproduction, preset `{args.preset}`: class- and text-conditional models", "",
             f"Command: `{command_line(args)}` — machine: {data.machine(args.device)}, {args.precision} — "
             f"wall time {total / 60:.1f} min ({', '.join(f'{k} {v / 60:.1f}' for k, v in timings.items())} min).", "",
             f"Denoisers: size {cfg['model']}, {cfg['steps']} steps per level at batch {cfg['batch']}, condition path "
             f"`{args.cond_path}`, text path `{args.text_path}`; DPM-Solver++(2M), {cfg['sample_steps']} steps per "
             f"level. FID: {cfg['n_samples']} "
             f"samples per model (random radicals / held-out definitions) against the held-out glyphs. Adherence: "
             f"the share of {cfg['n_prompt']} samples per prompt whose radical, read by a CNN trained on the "
             f"training glyphs ({accuracy:.3f} accuracy on the held-out glyphs), is the prompted one."]
    for cond in cfg["conds"]:
        w = " ".join(f"{v:g}" for v in cfg_weights(None, cond, deep))
        sig = default_sigmas(deep, cond)
        lines += ["", f"## {cond}-conditional (σ_{deep} … σ_2 = {', '.join(f'{v:g}' for v in sig)}; guidance w = {w} "
                  f"top-down, γ = 0.3)", "",
                  "| depth L | FID ↓, no guidance | FID ↓, guidance | adherence ↑, no guidance | adherence ↑, guidance |",
                  "|---|---|---|---|---|"]
        for d in cfg["depths"]:
            mean = {g: np.mean([shares[cond, d, g, p] for p in PROMPTS[cond]]) for g in (False, True)}
            lines.append(f"| {d} | {fids[cond, d, False]:.2f} | {fids[cond, d, True]:.2f} | {mean[False]:.3f} | "
                         f"{mean[True]:.3f} |")
        cols = [(d, g) for d in cfg["depths"] for g in (False, True)]
        lines += ["", "| prompt | radical | " + " | ".join(f"depth {d}{', guided' if g else ''}" for d, g in cols) + " |",
                  "|---|---|" + "---|" * len(cols)]
        for p in PROMPTS[cond]:
            shown = f"`--class {p}`" if cond == "class" else f'`--prompt "{p}"`'
            lines.append(f"| {shown} | {data.radical_name(targets[cond, p])} | "
                         + " | ".join(f"{shares[cond, d, g, p]:.3f}" for d, g in cols) + " |")
        lines += [""] + [f"![{cond} {p}]({slug((cond, deep, True), p)}.png)" for p in PROMPTS[cond]]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({
        "fid": [{"cond": c, "depth": d, "guided": g, "fid": f} for (c, d, g), f in fids.items()],
        "adherence": [{"cond": c, "depth": d, "guided": g, "prompt": p, "radical": targets[c, p] + 1, "share": v}
                      for (c, d, g, p), v in shares.items()],
        "classifier_accuracy": accuracy, "cond_path": args.cond_path, "text_path": args.text_path, "timings_s": timings,
        "machine": data.machine(args.device)}, indent=1, ensure_ascii=False))
    print("\n" + "\n".join(lines))


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=data.HelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="quick",
                   help="quick: ~16 min demo, depths 1 and 4; full: depths 1-3, guidance, oracle and the 1* baseline; sigma: "
                        "Table 1's σ_2 sweep and the clean (σ = 0) depth 3 on full's levels; long: full's "
                        "depths 1 and 3 with twice the image-level steps; quick-long: the same for quick at depths 1 "
                        "and 3 (seed its run folder with a copy of quick's); recon: quick's levels at depths 1 and 5 "
                        "plus depth 5 trained with every σ = 0 and its resamples of held-out glyphs (quick's run "
                        "folder); cond: class- and text-conditional depths 1 and 3, FID and prompt adherence; gpu: "
                        "full's depths 1 and 3, oracle and 1* at size S, batch 256, 3,000 steps (minutes on a GPU)")
    p.add_argument("--encoder", choices=list(ENCODER_NAMES), default="clip",
                   help="frozen encoder of the latent levels (hierarchy.py --encoder): clip, the glyph CLIP (--clip); "
                        "mocov3, a MoCo-v3 ViT trained on the glyphs (--pretrained); pixels, no network: each grid "
                        "cell's 16x16 thumbnail (an ablation); the last two not for preset cond")
    p.add_argument("--image-size", type=int, choices=(IMAGE_SIZE, 2 * IMAGE_SIZE), default=IMAGE_SIZE,
                   help="glyph size in px; the image level keeps 64 tokens (pixels at patch size/8), the encoder "
                        "its 32 px input (larger crops are resized to it); 64 with --min-crop 32 encodes the 2x2 "
                        "level from its own crops (the crop operator of §3.3); pixels only; own folders (-64px)")
    p.add_argument("--image-space", choices=IMAGE_SPACES, default="pixels",
                   help="the image level: pixels (patch size/8), or vae: the 8x8x4 latents of a glyph VAE (autoencoder.py, "
                        "trained when missing; the glyph analogue of the paper's SD-VAE), patch 1; own folders (-vae)")
    p.add_argument("--vae", default=None, help="--image-space vae: the glyph VAE's diffusers folder, trained when "
                                              "missing (default: checkpoints/glyph-vae-<preset>)")
    p.add_argument("--top-channels", type=int, default=None,
                   help="channels the top latent level keeps, halved per finer level (train.py --top-channels; "
                        "default: the paper's min(256, D/2), 64 for the 128-d glyph CLIP, whose SVD then keeps "
                        "99-100%% of the variance); fewer bind the bottleneck; own folders (-cC)")
    p.add_argument("--min-crop", type=int, default=H.MIN_CROP,
                   help="smallest crop in px that a latent grid cell is encoded from (hierarchy.py --min-crop, paper "
                        "§3.3: 64 px of 256); smaller cells pool the encoder's token map. The default never crops the "
                        "32 px glyphs; 8 is the paper's proportion (crops for the 2x2 and 4x4 levels)")
    p.add_argument("--clip", default=None, help="--encoder clip: glyph CLIP weights, trained when missing "
                                               "(default: checkpoints/glyph-clip-<preset>.pt)")
    p.add_argument("--pretrained", default=None,
                   help="--encoder mocov3: its weights, which must exist (train_encoder.py --objective mocov3 --train "
                        "--data glyphs --out FILE; default: checkpoints/mocov3-glyphs.pt)")
    p.add_argument("--depths", type=int, nargs="+", default=None,
                   help="the depths L to train and sample instead of the preset's (quick: 1 4; full: 1 2 3), e.g. 1 3 4; "
                        "levels shared with a shallower model are reused (paper §4.1)")
    p.add_argument("--baseline", default=None,
                   help="also train and sample Table 6's L = 1*: one level of this denoiser size (XS+: about the "
                        "forward GMACs of depth 3), same steps and batch as the image levels (full: XS+; gpu: S+; others: none)")
    p.add_argument("--model", choices=list(SIZES), default=None,
                   help="denoiser size of every level instead of the preset's (gpu: S; every other preset: XS; XS-U adds U-ViT's "
                        "long skips and output conv)")
    p.add_argument("--p-uncond", type=float, default=None,
                   help="probability that a level's conditions are replaced by their learned nulls in training "
                        "(train.py --p-uncond; default: the preset's, 0.5 for full, sigma, long and gpu, else the paper's 0.1: "
                        "0.5 costs depth 4 some FID at 800 steps and keeps depth 3 ahead of depth 1 at 1,600, README); "
                        "another value than the preset's trains into its own run and results folders (-p<value>)")
    p.add_argument("--model-guidance", type=float, default=0.0,
                   help="train every level with conditions with model guidance w (train.py --model-guidance; not in the "
                        "paper): the guidance is learnt, so the samples take one forward a step, unguided; into its "
                        "own run and results folders (-mg<w>)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps of every level instead of the preset's (image / latent levels: quick 800 / 800, "
                        "full 1000 / 1000, long 2000 / 1000, quick-long 1600 / 800, cond 2500 / 2500, gpu 3000 / 3000)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="sample.py --sampler of every model (default: ddim with --eta 1, the unconditional presets' "
                        "choice, README; preset cond: dpm++ and only dpm++): dpm++ (DPM-Solver++(2M), the paper's), ddim "
                        "or ddpm; another than the preset's samples the same trained levels into its own results "
                        "folder (-dpm++, -ddim-eta0.5 …)")
    p.add_argument("--eta", type=float, default=None,
                   help="--sampler ddim: DDIM η in [0, 1] (default 1, the DDPM posterior's noise; 0 deterministic)")
    p.add_argument("--data-dir", default="data", help="glyph dataset cache")
    p.add_argument("--cache-dir", default="cache", help="latent caches")
    p.add_argument("--runs", default=None, help="trained levels (default: runs/reproduce-<preset>; recon: quick's; "
                                               "--encoder mocov3: runs/reproduce-<preset>-mocov3)")
    p.add_argument("--out", default=None, help="results folder (default: results/<preset>; --encoder mocov3: "
                                               "results/<preset>-mocov3)")
    p.add_argument("--cond-path", choices=COND_PATHS, default="tokens",
                   help="how the latent levels enter each denoiser (train.py --cond-path)")
    p.add_argument("--prediction", choices=PREDICTIONS, default="v",
                   help="what every denoiser predicts (train.py --prediction): v (the default here: FID 136 -> 117 at "
                        "depth 1 of the quick preset, see README) or eps (the paper's)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="training and sampling arithmetic: auto = bf16 autocast where the device computes bf16 "
                        "natively (CUDA; a CPU with AMX or AVX-512-BF16), else fp32")
    p.add_argument("--text-path", choices=TEXT_PATHS, default="adaln",
                   help="preset cond: how a caption enters each text-conditional denoiser (train.py --text-path: "
                        "adaln, the pooled embedding, a step costing what a class step does; tokens, the paper's "
                        "per-token states, 1.5-2x the step)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device of every stage (encoder training, cache, training, sampling, FID)")
    p.add_argument("--defer-fid", action="store_true",
                   help="stop after sampling and list the samples in <results folder>/pending.json instead of scoring "
                        "them (for a machine without the FID weights, e.g. a GPU box; unconditional presets)")
    p.add_argument("--finish", action="store_true",
                   help="score the samples a --defer-fid run listed (same flags, its sample files at the same paths) "
                        "and write the results files; trains and samples nothing")
    return p


if __name__ == "__main__":
    data.run_main(main, get_parser().parse_args())
