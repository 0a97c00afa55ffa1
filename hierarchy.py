"""The latent hierarchy: per-level encoder features, SVD channel reduction, normalisation, σ-noise, cache.

Paper §3.3 and §4.1 (shared/paper.md §2). For a depth-L model the levels, top-down, are

    z_L: 1×1 grid, z_{L-1}: 2×2, z_{L-2}: 4×4, z_{L-3}: 8×8, ..., z_1 = x (pixels or SD-VAE latents)

Latent level l is the frozen encoder run on the M×M crop grid C(x, M), M = 2^(L-l) (§4.1), or, where a
crop would be smaller than ``min_crop`` pixels, its token map pooled to M×M (§4.1: "64×64 px").
Channels are cut by SVD (PCA, centred, one basis per grid size, fitted on training features): the top
keeps min(256, D/2) channels (paper: CLIP 512 -> 256) and each finer level halves them while the grid
doubles, so the total dimension grows linearly (§3.3). Each level is then divided by one global scalar
so that E[z²] = 1 per element: σ is absolute, so the scale matters (shared/paper.md §2.4).

Conditioning latents are made lossy with Gaussian noise (§3.3/§4.2): in training ẑ = z + σ ε; when
sampling with guidance ẑ ~ N(z, (t/T)^γ σ² I) (the variance form of §4.2; Table 3 uses γ = 0.3).

The cache holds the raw encoder features of every grid (float16, memory-mapped, one array per split
and grid; the whole-image embeddings once more in float32, which the KNN report reads), labels and
captions, and the PCA of each grid; the reduction is applied when a level is
read, so changing channel counts never re-runs the encoder; ``--reduced-cache`` also stores one depth's
levels reduced (fp16, 7.7 KB per ImageNet image at depth 5 instead of 87 KB of raw features). With
``--image-space sd-vae`` the bottom level is the SD-VAE latent (diffusers' AutoencoderKL; latent scale 0.18215,
0.23010 for COCO as in U-ViT), its posterior moments cached too. The encoder is CLIP (``--encoder clip``, the
paper's COCO choice) or MoCo-v3 (``--encoder mocov3 --pretrained FILE``, its ImageNet choice); the text tower
(``--cond text``) is the CLIP encoder's own unless ``--text-encoder`` names another (U-ViT used CLIP ViT-L/14's).

    python hierarchy.py --data glyphs --depth 5
"""
import argparse
import hashlib
import json
import math
import os
import time
import zipfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import data
from encoder import Encoder, MoCoV3Encoder, PixelEncoder, WeightsUnavailable
from denoiser import token_patch

TOP_CHANNELS_HELP = ("channels the top level's SVD keeps, halved at each finer level (default: min(256, D/2), the "
                     "paper's rule for an encoder of width D; fewer bind the bottleneck)")
MIN_CROP = 64              # paper §4.1: a grid cell of at least 64 px is encoded from its own crop
VAE_SCALE = 0.18215        # SD-VAE latent scale (LDM / U-ViT ImageNet): latents are scaled to about unit variance
VAE_SCALES = {"coco": 0.23010}  # per-dataset exceptions (U-ViT's COCO scripts, shared/paper.md §4.2)
PCA_FIT_VECTORS = 200_000  # feature vectors (grid cells) used to fit each level's basis
# σ_l per latent grid for each conditioning mode (shared/paper.md §2.5, Table 1 argmins, COCO: 0.5)
SIGMAS = {"none": {1: 0.0, 2: 0.5, 4: 0.5, 8: 1.0},
          "class": {1: 0.5, 2: 0.5, 4: 1.0, 8: 1.0},
          "text": {1: 0.5, 2: 0.5, 4: 0.5, 8: 0.5}}


@dataclass(frozen=True)
class Level:
    """One level of the hierarchy: a ``grid``×``grid`` map of ``channels`` (the image level has ``image=True``)."""
    grid: int
    channels: int
    patch: int
    image: bool = False

    @property
    def shape(self):
        return (self.channels, self.grid, self.grid)

    @property
    def name(self):
        return f"image{self.channels}x{self.grid}" if self.image else f"z{self.grid}x{self.grid}c{self.channels}"


def latent_channels(grid, enc_dim, top=None):
    """Channels kept at an M×M level: ``top`` at the top (default min(256, D/2), paper §2.2), halved per
    doubling of M."""
    return max(1, (top or min(256, enc_dim // 2)) // grid)


def level_specs(depth, enc_dim, image_shape, image_patch, top_channels=None):
    """The ``depth`` levels, top-down: latent grids 1, 2, 4, ... (``top_channels`` at the top, latent_channels)
    then the image level ``image_shape`` (C, H, W)."""
    grids = [2 ** k for k in range(depth - 1)]
    latents = [Level(m, latent_channels(m, enc_dim, top_channels), token_patch(m)) for m in grids]
    return latents + [Level(image_shape[1], image_shape[0], image_patch, image=True)]


def meta_levels(meta):
    """The levels a trained level reads, top-down, then its own, as its meta.json (train.py) records them."""
    conds = [Level(grid, channels, token_patch(grid)) for channels, grid, _ in meta["conds"]]
    channels, grid, _ = meta["target"]
    return conds + [Level(grid, channels, meta["patch"], image=meta["target_image"])]


def sigma_for(grid, cond, sigmas=None):
    """σ of a conditioning level (absolute, on unit-RMS latents); grids finer than 8×8 reuse the 8×8 value."""
    table = sigmas or SIGMAS[cond]
    return table.get(grid, table[max(g for g in table if g <= grid)])


def noise_train(z, sigma, generator=None, eps=None):
    """Training-time corruption of a condition: ẑ = z + σ ε (paper §3.3); ε drawn here unless given."""
    if eps is None:
        eps = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
    return z + sigma * eps


def noise_sample(z, sigma, t, T, gamma, generator=None):
    """Sampling-time condition noise ẑ ~ N(z, (t/T)^γ σ² I) (paper §4.2, Table 3); γ = inf means clean."""
    if sigma == 0 or math.isinf(gamma):
        return z
    std = sigma * (t.float() / T).pow(gamma / 2).view(-1, *([1] * (z.dim() - 1)))  # (B, 1, 1, 1)
    return z + std * torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)


# ----------------------------------------------------------------------------------------------------
# SVD channel reduction with unit-RMS normalisation
# ----------------------------------------------------------------------------------------------------

def fit_pca(vectors):
    """Centred SVD of (N, D) feature vectors: mean (D,), basis (D, D) with orthonormal columns, variances (D,)."""
    x = torch.as_tensor(vectors, dtype=torch.float64)
    mean = x.mean(0)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)                # vh: (D, D)
    return {"mean": mean.numpy(), "basis": vh.T.numpy(), "variance": (s ** 2 / len(x)).numpy()}


class Reduction:
    """z = (f - μ) V_k / s_k for a grid's features f (B, D, M, M) -> (B, k, M, M); s_k makes E[z²] = 1."""

    def __init__(self, pca, k):
        self.k = k
        self.mean = torch.as_tensor(pca["mean"], dtype=torch.float32)                  # (D,)
        self.basis = torch.as_tensor(pca["basis"][:, :k], dtype=torch.float32)         # (D, k)
        self.scale = float(np.sqrt(pca["variance"][:k].mean()))
        self.kept = float(pca["variance"][:k].sum() / pca["variance"].sum())           # variance fraction kept

    def __call__(self, f):
        f = torch.as_tensor(f, dtype=torch.float32).movedim(1, -1)                     # (B, M, M, D)
        mean, basis = self.mean.to(f.device), self.basis.to(f.device)                  # on the features' device
        return ((f - mean) @ basis / self.scale).movedim(-1, 1)                        # (B, k, M, M)

    def inverse(self, z):
        mean, basis = self.mean.to(z.device), self.basis.to(z.device)
        return (z.movedim(1, -1) * self.scale @ basis.T + mean).movedim(-1, 1)         # (B, D, M, M)


# ----------------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------------

def load_vae(name, device="cpu"):
    """diffusers' AutoencoderKL by model id or local folder (the SD-VAE bottom level)."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise data.UsageError("--image-space sd-vae needs diffusers: pip install diffusers") from e
    try:
        return AutoencoderKL.from_pretrained(name).to(device).eval().requires_grad_(False)
    except (OSError, ValueError) as e:
        raise data.UsageError(f"cannot load the SD-VAE {name!r} ({str(e).splitlines()[0]}); "
                              "pass --vae a local diffusers folder or a model id reachable online") from e


def vae_scale(data_name, vae=None):
    """Latent scale of a dataset's VAE: 0.23010 for COCO (U-ViT's, with the SD-VAE), else the VAE's own
    ``scaling_factor`` (the SD-VAE's 0.18215; autoencoder.py's glyph VAE sets its own), 0.18215 without one."""
    return VAE_SCALES.get(data_name, vae.config.scaling_factor if vae is not None else VAE_SCALE)


def latent_shape(vae, x0):
    """(C, H, W) of the VAE latent of an image x0 (C, H, W): each down block but the last halves the side."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return [vae.config.latent_channels, x0.shape[1] // factor, x0.shape[2] // factor]


def vae_input(vae, x):
    """Images x (B, C, H, W) as the VAE takes them: greyscale repeated to RGB for the SD-VAE (3 channels in)."""
    return x.expand(-1, vae.config.in_channels, -1, -1)


def vae_id(name):
    """The --vae as the cache's name holds it: a model id, or a local folder with a digest of its weights (a VAE
    retrained into the same folder gets a new cache)."""
    weights = sorted(Path(name).glob("*.safetensors")) + sorted(Path(name).glob("*.bin")) if Path(name).is_dir() else []
    return name + "".join(file_digest(w) for w in weights)


def data_tag(name):
    """A folder-safe name for a dataset (folder:PATH becomes folder-<hash of PATH>)."""
    return name if not name.startswith("folder:") else "folder-" + hashlib.sha1(name.encode()).hexdigest()[:8]


def make_encoder(args, device=None):
    """The frozen encoder named by --encoder/--clip/--pretrained; "random" gives seeded untrained weights (ablations,
    tests). Offline, a hub tag that cannot be downloaded ends in one line naming the command that trains an encoder."""
    device = device or args.device
    if args.encoder == "pixels":
        return PixelEncoder(device)
    make = (lambda w: MoCoV3Encoder(w, device)) if args.encoder == "mocov3" else (lambda w: Encoder(args.clip, w, device))
    if args.pretrained != "random":
        try:
            return make(args.pretrained)
        except WeightsUnavailable as e:
            raise data.UsageError(f"{e}; offline, train an encoder on your images with: {train_encoder_command(args.data)} "
                                  f"and pass --encoder mocov3 --pretrained {trained_encoder_path(args.data)}") from e
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return make(None)


def trained_encoder_path(data_name):
    return f"checkpoints/mocov3-{data_tag(data_name)}.pt"


def train_encoder_command(data_name):
    """The command that trains a MoCo-v3 encoder on a dataset, offline (train_encoder.py)."""
    return f"python train_encoder.py --objective mocov3 --train --data {data_name} --out {trained_encoder_path(data_name)}"


def make_text_encoder(args, device=None):
    """The frozen text tower for --cond text: --text-encoder NAME:WEIGHTS (an open_clip model; WEIGHTS a tag, a file,
    or random), else the image encoder's."""
    if args.text_encoder is None:
        if args.encoder != "clip":
            raise data.UsageError(f"--encoder {args.encoder} has no text tower; pass --text-encoder NAME:WEIGHTS "
                                  "(an open_clip model, e.g. ViT-L-14:openai as in U-ViT)")
        return make_encoder(args, device)
    name, _, weights = args.text_encoder.partition(":")
    if weights not in ("", "random"):
        return Encoder(name, weights, device or args.device)
    with torch.random.fork_rng():  # untrained (tests, ablations): the same seeded weights in training and sampling
        torch.manual_seed(0)
        return Encoder(name, None, device or args.device)


def cache_name(args):
    """Folder name that identifies everything the cached features depend on (the encoder weights by file name;
    meta.json keeps their digest, weights_digest)."""
    tag = data_tag(args.data)
    weights = Path(args.pretrained).stem if Path(args.pretrained).exists() else args.pretrained
    vae = f"-vae{hashlib.sha1(vae_id(args.vae).encode()).hexdigest()[:6]}" if args.image_space == "sd-vae" else ""
    name = args.clip if args.encoder == "clip" else args.encoder
    return f"{tag}-{args.image_size}px-{name}-{weights}-crop{args.min_crop}{vae}"


class Hierarchy:
    """A latent cache folder: per-split raw features per grid, labels, captions, PCA per grid. Its meta.json
    holds the size of every file, so a damaged or truncated file is named instead of read."""

    def __init__(self, root):
        self.root = Path(root)
        meta_path = self.root / "meta.json"
        if not meta_path.exists():
            raise data.UsageError(f"no latent cache at {self.root}; build it with python hierarchy.py --data ...")
        self.meta = data.read_json(meta_path, self.remedy)
        for name, size in self.meta.get("files", {}).items():
            have = (self.root / name).stat().st_size if (self.root / name).exists() else None
            if have != size:
                found = "missing" if have is None else f"{have} bytes, expected {size}"
                raise data.UsageError(f"latent cache file {self.root / name} is damaged ({found}); {self.remedy}")
        self.enc_dim, self.image_shape = self.meta["enc_dim"], tuple(self.meta["image_shape"])
        self.pca = {int(m): self._read(f"pca-{m}.npz") for m in self.meta["grids"]}

    @property
    def vae_scale(self):
        return self.meta.get("vae_scale") or vae_scale(self.meta["args"]["data"])  # caches before the key: SD-VAE's

    @property
    def remedy(self):
        return f"delete the folder {self.root} to rebuild the cache"

    def _read(self, name, **kw):
        """An array file of the cache (an .npz as a dict), or a UsageError naming it."""
        try:
            if name.endswith(".json"):
                return json.loads((self.root / name).read_text())
            out = np.load(self.root / name, **kw)
            return dict(out) if name.endswith(".npz") else out
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
            raise data.UsageError(f"latent cache file {self.root / name} cannot be read "
                                  f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); {self.remedy}") from None

    def levels(self, depth, image_patch, top_channels=None):
        if top_channels is not None and not 1 <= top_channels <= self.enc_dim:
            raise data.UsageError(f"--top-channels must be in 1..{self.enc_dim} (the encoder's width), got {top_channels}")
        return level_specs(depth, self.enc_dim, self.image_shape, image_patch, top_channels)

    def reduction(self, level):
        """The channel reduction of a latent level; a UsageError if the cache has too few training vectors."""
        have = self.pca[level.grid]["basis"].shape[1]
        if have < level.channels:
            raise data.UsageError(f"the latent cache {self.root} has {have} training vectors at grid {level.grid}, "
                                  f"fewer than the {level.channels} channels of {level.name}; use more training images")
        return Reduction(self.pca[level.grid], level.channels)

    def features(self, split, grid):
        return self._read(f"{split}-{grid}.npy", mmap_mode="r")                       # (N, D, M, M) float16

    def embeddings(self, split):
        """The whole-image embeddings (N, D) in float32, the 1×1 level before its float16 rounding (what
        ``train_encoder.py --knn --latent-cache`` reads instead of embedding the split again); None in a
        cache written without them."""
        name = f"{split}-embed.npy"
        return self._read(name, mmap_mode="r") if (self.root / name).exists() else None

    def vae_moments(self, split):
        return self._read(f"{split}-vae.npy", mmap_mode="r")                          # (N, 8, h, w) float16

    def reduced_path(self, split, level):
        return self.root / f"{split}-{level.name}.npy"                                  # (N, k, M, M) float16

    def reduced(self, split, level):
        """A level's reduced latents (SVD and scale applied when written, ``write_reduced``), memory-mapped."""
        path = self.reduced_path(split, level)
        if not path.exists():
            raise data.UsageError(f"no reduced latents {path.name} in {self.root}; "
                                  "write them with python hierarchy.py --reduced-cache --depth L [--top-channels C]")
        return np.load(path, mmap_mode="r")

    def labels(self, split):
        return self._read(f"{split}-labels.npy")

    def captions(self, split):
        return self._read(f"{split}-captions.json")


def locate_cache(meta, run_dir, cache_dir="cache"):
    """The latent cache of a trained level: its path relative to the level's run folder (so a run folder
    moved together with its cache still finds it, from any working directory), else the folder of that
    name under ``cache_dir``. Older meta.json files stored the path itself: it is tried too."""
    name = Path(meta["cache"]).name
    tried = [Path(run_dir) / meta["cache_rel"]] if "cache_rel" in meta else []
    tried += [Path(cache_dir) / name] + ([Path(meta["cache"])] if meta["cache"] != name else [])
    for root in tried:
        if (root / "meta.json").exists():
            return Hierarchy(root)
    raise data.UsageError(f"latent cache {name} of {run_dir} not found (tried {', '.join(map(str, tried))}); "
                          "pass --cache-dir the folder that holds it")


def build_cache(args, encoder=None, vae=None):
    """Encode the dataset once into ``<cache-dir>/<name>``; grids already cached are kept. Returns a Hierarchy.
    One process at a time builds a cache (a lock file in it); a second one exits with one line."""
    root = Path(args.cache_dir) / cache_name(args)
    digest = weights_digest(args)
    if not _missing(root, args, digest):
        return Hierarchy(root)
    with data.folder_lock(root, "the latent cache"):
        missing = _missing(root, args, digest)  # another process may have completed it in the meantime
        return _extend_cache(root, args, digest, *missing, encoder, vae) if missing else Hierarchy(root)


def weights_digest(args):
    """SHA-1 of the encoder's weights file (--pretrained), None for a hub tag or random weights. The cache's name
    holds the file's name only; its meta.json holds this, so weights retrained into the same file are noticed."""
    path = Path(args.pretrained)
    return file_digest(path) if path.is_file() else None


def file_digest(path):
    """SHA-1 of a file's bytes, read in chunks."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def refuse_other_weights(root, meta, args, digest):
    """One line, unless the cache ``root`` (its ``meta``) was encoded with the weights of SHA-1 ``digest``
    (weights_digest of ``args``); caches written before the digest was kept pass."""
    if meta.get("weights_sha1", digest) != digest:
        raise data.UsageError(f"latent cache {root} was encoded with other weights than {args.pretrained} (changed "
                              f"since); pass another --cache-dir, or delete the folder to re-encode it")


def _missing(root, args, digest):
    """(cache meta, grids to encode, whether the VAE moments are to encode), or None when nothing is missing. A cache
    encoded with other weights of the same file name stops here with one line: its latents would be stale, and the
    levels trained on them may still need it."""
    meta_path = root / "meta.json"
    meta = data.read_json(meta_path, f"delete the folder {root} to rebuild the cache") if meta_path.exists() else {}
    refuse_other_weights(root, meta, args, digest)
    grids = [2 ** k for k in range(args.depth - 1)]
    todo = [m for m in grids if m not in meta.get("grids", [])]
    need_vae = args.image_space == "sd-vae" and not meta.get("vae")
    return None if meta and not todo and not need_vae else (meta, todo, need_vae)


def _extend_cache(root, args, digest, meta, todo, need_vae, encoder, vae):
    """Encode what is missing (``todo`` grids, VAE moments) into the cache folder ``root``, whose encoder weights
    have the SHA-1 ``digest`` (weights_digest)."""
    meta_path = root / "meta.json"
    # the datasets first: a wrong --data-path stops before any encoder or VAE is loaded (or downloaded)
    splits = {split: data.build_dataset(args.data, split, args.image_size, args.data_path, args.data_dir)
              for split in ("train", "test")}
    encoder = encoder or make_encoder(args)
    vae = vae or (load_vae(args.vae, args.device) if need_vae else None)
    for split, ds in splits.items():
        if not meta:  # labels and captions once per split
            np.save(root / f"{split}-labels.npy", np.asarray(ds.labels, dtype=np.int64))
            caps = ds.captions if ds.has_captions else [""] * len(ds)
            caps = [c if isinstance(c, list) else [c] for c in caps]
            (root / f"{split}-captions.json").write_text(json.dumps(caps, ensure_ascii=False))
        _encode_split(ds, split, root, todo, encoder, vae if need_vae else None, args)
    for m in todo:
        pca = fit_pca(_sample_vectors(np.load(root / f"train-{m}.npy", mmap_mode="r"), args.seed))
        data.save_npz(root / f"pca-{m}.npz", **pca)
    x0 = ds[0][0]
    image_shape = list(x0.shape) if args.image_space == "pixels" else meta.get("image_shape") or latent_shape(vae, x0)
    meta = {"grids": sorted(set(meta.get("grids", [])) | set(todo)), "enc_dim": encoder.dim,
            "num_classes": ds.num_classes, "has_captions": ds.has_captions,
            "image_shape": image_shape, "image_space": args.image_space, "vae": bool(meta.get("vae") or need_vae),
            "weights_sha1": digest, "vae_scale": vae_scale(args.data, vae) if vae is not None else meta.get("vae_scale"),
            "args": {k: getattr(args, k) for k in ("data", "image_size", "encoder", "clip", "pretrained", "min_crop", "vae")}}
    meta["files"] = {p.name: p.stat().st_size for p in sorted(root.iterdir())
                     if p.suffix in (".npy", ".npz", ".json") and p.name != "meta.json"}
    data.atomic_write(meta_path, lambda p: p.write_text(json.dumps(meta, indent=1)))
    return Hierarchy(root)


def write_reduced(hier, depth, chunk=4096, top_channels=None):
    """The reduced cache of a depth (``top_channels`` at its top level, latent_channels): each latent level's SVD
    and scale applied to the raw features, stored as
    float16 (N, k, M, M) per split, streamed ``chunk`` images at a time; read by LevelData(reduced=True).
    Returns bytes per image. The raw features may be deleted afterwards to save disk (re-reducing needs them)."""
    levels = [lv for lv in hier.levels(depth, image_patch=1, top_channels=top_channels) if not lv.image]
    for split in ("train", "test"):
        for lv in levels:
            feats, reduce, path = hier.features(split, lv.grid), hier.reduction(lv), hier.reduced_path(split, lv)
            tmp = path.with_name(path.name + ".tmp")
            try:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(feats), *lv.shape))
                for i in tqdm(range(0, len(feats), chunk), desc=f"reduce {split} {lv.name}", unit="chunk"):
                    out[i:i + chunk] = reduce(feats[i:i + chunk].astype(np.float32)).half().numpy()
                out.flush()
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
    return sum(2 * lv.channels * lv.grid ** 2 for lv in levels)


def _sample_vectors(feats, seed):
    """Up to PCA_FIT_VECTORS grid-cell vectors (rows of D) from (N, D, M, M) features."""
    n, d, m, _ = feats.shape
    images = min(n, max(1, PCA_FIT_VECTORS // (m * m)))
    pick = np.sort(np.random.default_rng(seed).choice(n, images, replace=False))
    return np.asarray(feats[pick], dtype=np.float32).transpose(0, 2, 3, 1).reshape(-1, d)


@torch.no_grad()
def _encode_split(ds, split, root, grids, encoder, vae, args):
    """One pass over a split: raw features of every grid in ``grids`` (and VAE moments) streamed batch by
    batch into .npy memmaps, so memory holds one batch whatever the dataset size. Each file is written
    under a temporary name and renamed when the split is complete: a killed run leaves no partial file."""
    loader = DataLoader(ds, batch_size=args.encode_batch, num_workers=args.workers)
    names = [str(m) for m in grids] + (["embed"] if 1 in grids else []) + (["vae"] if vae is not None else [])
    tmps = {k: root / f"{split}-{k}.npy.tmp" for k in names}
    outs, i = {}, 0
    try:
        for x, _, _ in tqdm(loader, desc=f"encode {split}", unit="batch"):
            x = x.to(args.device)
            feats = encoder.features(x, grids, args.min_crop)
            batch = {str(m): f for m, f in feats.items()}                                       # (B, D, m, m)
            if 1 in feats:  # the whole-image embedding once more in float32: what the KNN report reads
                batch["embed"] = feats[1].flatten(1)                                            # (B, D)
            if vae is not None:
                dist = vae.encode(vae_input(vae, x)).latent_dist
                batch["vae"] = torch.cat([dist.mean, dist.std], 1)                              # (B, 8, h, w)
            for k, v in batch.items():
                dtype = np.float32 if k == "embed" else np.float16
                if k not in outs:
                    outs[k] = np.lib.format.open_memmap(tmps[k], mode="w+", dtype=dtype, shape=(len(ds), *v.shape[1:]))
                outs[k][i:i + len(v)] = v.to(torch.float32 if k == "embed" else torch.float16).cpu().numpy()
            i += len(x)
        for k, out in outs.items():
            out.flush()
            os.replace(tmps[k], root / f"{split}-{k}.npy")
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------
# Training data: a target level and all the levels above it
# ----------------------------------------------------------------------------------------------------

class LevelData(Dataset):
    """(target (C,M,M), [clean condition levels top-down], class id, caption) for one level of one split.

    ``levels`` is top-down and ends with the target. The σ-noise is added by the training loop, not here,
    so the cache and this dataset stay deterministic (but for SD-VAE posterior sampling and caption choice).
    """

    def __init__(self, hier, split, levels, base=None, reduced=False):
        self.hier, self.levels = hier, levels
        self.labels, self.captions = hier.labels(split), hier.captions(split)
        if reduced:  # latents stored already reduced (write_reduced): read, no reduction
            self.feats = {lv.grid: hier.reduced(split, lv) for lv in levels if not lv.image}
            self.reduce = {lv.grid: torch.from_numpy for lv in levels if not lv.image}
        else:
            self.feats = {lv.grid: hier.features(split, lv.grid) for lv in levels if not lv.image}
            self.reduce = {lv.grid: hier.reduction(lv) for lv in levels if not lv.image}
        sd_vae_target = levels[-1].image and hier.meta["image_space"] == "sd-vae"
        self.vae = hier.vae_moments(split) if sd_vae_target else None  # moments
        self.base = base  # the image dataset, when the target is the image level in pixel space

    def __len__(self):
        return len(self.labels)

    def level(self, lv, idx):
        """Level ``lv`` of the items ``idx`` (a list): (len(idx), C, M, M); the SD-VAE image level as its
        posterior moments (len(idx), 8, h, w), sampled by ``finish``."""
        if not lv.image:
            return self.reduce[lv.grid](self.feats[lv.grid][idx].astype(np.float32))
        if self.vae is not None:
            return torch.from_numpy(self.vae[idx].astype(np.float32))
        return torch.stack([self.base[i][0] for i in idx])                                      # (B, C, H, W)

    def load(self, idx, device="cpu"):
        """The deterministic part of a batch, on ``device``: (levels top-down, labels (B,), idx). Safe to run
        in another thread (``prefetch``); pinned and non-blocking on CUDA."""
        move = (lambda a: a.pin_memory().to(device, non_blocking=True)) if torch.device(device).type == "cuda" \
            else (lambda a: a.to(device))  # noqa: E731
        return [move(self.level(lv, idx)) for lv in self.levels], move(torch.from_numpy(self.labels[idx])), idx

    def finish(self, loaded, draw=None):
        """(target (B,C,M,M), [conditions top-down], labels (B,), captions) from ``load``'s output: the SD-VAE
        posterior samples and the caption of each item (one of its several) come from ``draw`` (randn(like),
        rand(like) on the CPU: train.py's per-step data draws), or from the global RNG when None."""
        zs, y, idx = loaded
        if self.vae is not None:
            mean, std = zs[-1].chunk(2, dim=1)                                                  # (B, 4, h, w) each
            eps = draw.randn(torch.empty(std.shape)).to(std.device) if draw else torch.randn_like(std)
            zs[-1] = (mean + std * eps) * self.hier.vae_scale
        u = draw.rand(torch.empty(len(idx))) if draw else torch.rand(len(idx))                  # (B,) in [0, 1)
        captions = [self.captions[i][min(int(v * len(self.captions[i])), len(self.captions[i]) - 1)]
                    for i, v in zip(idx, u.tolist())]
        return zs[-1], zs[:-1], y, captions

    def batch(self, idx, draw=None, device="cpu"):
        """(target (B,C,M,M), [conditions top-down], labels (B,), captions) of the items ``idx``."""
        return self.finish(self.load(idx, device), draw)

    def __getitem__(self, i):
        target, conds, y, captions = self.batch([i])
        return target[0], [c[0] for c in conds], int(y[0]), captions[0]


def prefetch(dataset, items, device, ahead=2):
    """``dataset.batch(idx, draw)`` for each ``(idx, draw)`` of ``items``, the deterministic part (cache read,
    reduction, copy to ``device``) run ``ahead`` batches early in a background thread while the caller trains;
    the random part runs in the caller's thread in order, so the batches are those of a plain loop. On the CPU
    the batches are assembled in the caller's thread: there is no idle core to overlap with, and a second thread
    only stalls the step's OpenMP team (the one-token glyph level ran at 0.41 of its model's rate with the
    thread, 0.62 without; benchmarks/bench_train.py)."""
    if torch.device(device).type == "cpu":
        yield from (dataset.batch(idx, draw, device) for idx, draw in items)
        return
    pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
    pending = deque()
    try:
        for idx, draw in items:
            pending.append((pool.submit(dataset.load, idx, device), draw))
            if len(pending) > ahead:
                loaded, draw = pending.popleft()
                yield dataset.finish(loaded.result(), draw)
        while pending:
            loaded, draw = pending.popleft()
            yield dataset.finish(loaded.result(), draw)
    finally:  # also when the caller stops early (an exception, or a generator closed unfinished)
        pool.shutdown(wait=False, cancel_futures=True)


def encode_image(hier, encoder, x, levels, min_crop, vae=None):
    """The clean latents of real images x (B, C, H, W) in [-1, 1] at each of ``levels`` (for resampling)."""
    feats = encoder.features(x, [lv.grid for lv in levels if not lv.image], min_crop)  # one pass for pooled levels
    out = []
    for lv in levels:
        if not lv.image:
            out.append(hier.reduction(lv)(feats[lv.grid].float()))
        elif vae is not None:
            out.append(vae.encode(vae_input(vae, x)).latent_dist.mean * hier.vae_scale)
        else:
            out.append(x)
    return out


# ----------------------------------------------------------------------------------------------------
# Command line (shared with train.py and sample.py)
# ----------------------------------------------------------------------------------------------------

def add_hierarchy_args(p):
    """The flags that define a latent cache: the same in hierarchy.py, train.py and sample.py."""
    p.add_argument("--data", default="glyphs", help=f"dataset: {', '.join(data.DATASETS)}")
    p.add_argument("--data-path", default=None, help="root of imagenet (train/, val/) or coco (train2014/, annotations/)")
    p.add_argument("--data-dir", default="data", help="where the glyph dataset cache lives")
    p.add_argument("--image-size", type=int, default=None, help="image size in pixels (default: 32 for glyphs, else 256)")
    p.add_argument("--encoder", choices=("clip", "mocov3", "pixels"), default="clip",
                   help="frozen encoder: an open_clip model (--clip), or a MoCo-v3 ViT (--pretrained FILE: the official "
                        "vit-b-300ep.pth.tar or train_encoder.py's output); pixels: no network, each crop's 16x16 "
                        "thumbnail (an ablation; every level from its crops, --min-crop ignored)")
    p.add_argument("--clip", default=None, help="open_clip model name (default: glyph-clip for glyphs, else ViT-B-16)")
    p.add_argument("--pretrained", default=None,
                   help="encoder weights: an open_clip tag (needs internet), a local file, or random (default for clip: "
                        "checkpoints/glyph-clip.pt for glyphs, else laion2b_s34b_b88k; mocov3 needs a file)")
    p.add_argument("--text-encoder", default=None,
                   help="--cond text: open_clip NAME:WEIGHTS of the text tower, e.g. ViT-L-14:openai as U-ViT "
                        "(default: the --encoder clip model's own)")
    p.add_argument("--min-crop", type=int, default=MIN_CROP,
                   help="smallest crop (px) encoded on its own; finer grids pool the token map (paper: 64 at 256px)")
    p.add_argument("--image-space", choices=("pixels", "sd-vae"), default=None,
                   help="bottom level: pixels, or SD-VAE latents (default: pixels for glyphs, else sd-vae)")
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-ema", help="diffusers AutoencoderKL id or local folder")
    p.add_argument("--cache-dir", default="cache", help="where latent caches are written")
    p.add_argument("--encode-batch", type=int, default=256, help="images per batch when building the cache")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes for encoding")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device for the encoder (and, in train.py and sample.py, the denoisers)")
    p.add_argument("--seed", type=int, default=0, help="seed for the PCA fit subsample")
    p.add_argument("--reduced-cache", action="store_true",
                   help="hierarchy.py: also write each latent level of --depth reduced (SVD and scale applied, fp16); "
                        "train.py: read the latents from it")
    return p


def resolve_defaults(args):
    """Check the flags of add_hierarchy_args (before anything is read or built) and fill the
    dataset-dependent defaults in place."""
    data.check_dataset_name(args.data)
    for flag, low in (("--image-size", 1), ("--min-crop", 1), ("--encode-batch", 1), ("--workers", 0)):
        data.check_range(flag, getattr(args, flag[2:].replace("-", "_")), low)
    glyphs = args.data == "glyphs"
    args.image_size = args.image_size or (32 if glyphs else 256)
    args.clip = args.clip or ("glyph-clip" if glyphs else "ViT-B-16")
    args.image_space = args.image_space or ("pixels" if glyphs else "sd-vae")
    if args.encoder == "pixels":  # no weights
        args.pretrained = "none"
    if args.encoder == "mocov3" and args.pretrained is None:
        raise data.UsageError(f"--encoder mocov3 needs --pretrained FILE (the official vit-b-300ep.pth.tar, or train one "
                              f"with: {train_encoder_command(args.data)})")
    args.pretrained = args.pretrained or ("checkpoints/glyph-clip.pt" if args.clip == "glyph-clip" else "laion2b_s34b_b88k")
    if args.encoder == "clip" and args.clip == "glyph-clip" and args.pretrained != "random" \
            and not Path(args.pretrained).exists():
        raise data.UsageError(f"glyph CLIP weights {args.pretrained} not found; "
                              "train them with python train_encoder.py --objective clip --train --data glyphs")
    return args


def main(args):
    data.check_range("--depth", args.depth, 1)
    data.check_range("--top-channels", args.top_channels, 1)
    resolve_defaults(args)
    start = time.time()
    hier = build_cache(args)
    print(f"latent cache {hier.root} ({time.time() - start:.1f}s)")
    print(f"{'level':>6} {'name':>14} {'shape':>14} {'tokens':>6} {'variance kept':>14}")
    for k, lv in enumerate(hier.levels(args.depth, image_patch=1, top_channels=args.top_channels)):
        kept = "" if lv.image else f"{hier.reduction(lv).kept:14.3f}"
        tokens = "" if lv.image else (lv.grid // lv.patch) ** 2
        print(f"{args.depth - k:>6} {lv.name:>14} {str(lv.shape):>14} {tokens:>6} {kept}")
    if args.reduced_cache:
        per_image = write_reduced(hier, args.depth, top_channels=args.top_channels)
        print(f"reduced latents of depth {args.depth}: {per_image / 1e3:.2f} KB per image (raw features: "
              f"{sum(2 * hier.enc_dim * m * m for m in hier.meta['grids'] if m < 2 ** (args.depth - 1)) / 1e3:.2f} KB)")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=data.HelpFormatter)
    add_hierarchy_args(p)
    p.add_argument("--depth", type=int, default=5, help="number of levels L (the paper's main model: 5)")
    p.add_argument("--top-channels", type=int, default=None, help=TOP_CHANNELS_HELP)
    return p


if __name__ == "__main__":
    data.run_main(main, get_parser().parse_args())
