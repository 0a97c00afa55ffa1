"""Frozen visual encoder on patchified images: the crop operator C(x, M) and the per-level features z_l = E(C(x, M)).

Paper §3.3 (z_l = E(C(x, M)), M = 2^(L-l) in the experiments, §4.1) and shared/paper.md §2.1-2.2:
- each of the M*M crops of size H/M is encoded separately (pooled, projected embedding: CLIP's `encode_image`);
- when a crop would be smaller than 64 px, the backbone's patch-token map (after the final norm, projected into
  the joint space) is average-pooled to M x M instead.
Any open_clip model works (the paper uses CLIP ViT-B/16: `Encoder("ViT-B-16", "laion2b_s34b_b88k")`, needs internet).

No pretrained CLIP can be downloaded offline, so `python encoder.py --train` trains a small CLIP ("glyph-clip",
CLIP: Radford et al. 2021, contrastive loss `open_clip.loss.ClipLoss`) on glyph/definition pairs and reports the KNN
radical accuracy (K = 20, the metric of paper Table 5) of its features against the same network with random weights.
"""
import argparse
import json
import math
import os
import sys
import tempfile
import time
import warnings

import open_clip
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data

# Small CLIP for 32 px glyphs: 8x8 patch tokens like ViT-B/16's 14x14 at 224 px, a short text context for
# dictionary definitions. About 1.8M vision + 11M text parameters (9.5M of them the token embedding).
GLYPH_CLIP = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 192, "layers": 4, "head_width": 64},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 192, "heads": 3, "layers": 3},
}


def register_model_config(name, cfg):
    """Register an open_clip model config under `name` (open_clip only reads configs from JSON files)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, f"{name}.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        open_clip.add_model_config(path)  # parsed now; the registry keeps the config after the file is gone


register_model_config("glyph-clip", GLYPH_CLIP)


# ----------------------------------------------------------------------------------------------------------------
# Crop operator C(x, M) (paper §3.3)
# ----------------------------------------------------------------------------------------------------------------

def crop_grid(x, M):
    """C(x, M): split (B, C, H, W) images into M*M non-overlapping crops -> (B*M*M, C, H/M, W/M), row-major per image."""
    B, C, H, W = x.shape
    if H % M or W % M:
        raise data.UsageError(f"image size {H}x{W} is not divisible by the grid {M}; use an image size divisible by {M}")
    x = x.reshape(B, C, M, H // M, M, W // M)  # (B, C, i, h, j, w)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B * M * M, C, H // M, W // M)


def uncrop_grid(c, M):
    """Inverse of crop_grid: (B*M*M, C, h, w) -> (B, C, M*h, M*w)."""
    N, C, h, w = c.shape
    c = c.reshape(N // (M * M), M, M, C, h, w)  # (B, i, j, C, h, w)
    return c.permute(0, 3, 1, 4, 2, 5).reshape(N // (M * M), C, M * h, M * w)


def preprocess(x, image_size, mean, std):
    """Images (B, C, H, W) in [-1, 1], C in {1, 3} -> encoder input (B, 3, S, S): grey to RGB, bicubic resize, normalise."""
    if x.shape[1] not in (1, 3):
        raise data.UsageError(f"the encoder takes 1- or 3-channel images, got {x.shape[1]} channels")
    x = (x.expand(-1, 3, -1, -1) + 1) / 2  # (B, 3, H, W) in [0, 1]
    if tuple(x.shape[-2:]) != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", antialias=True, align_corners=False)
        x = x.clamp(0, 1)  # bicubic overshoots; PIL's resize of uint8 images clamps the same way
    return (x - mean) / std


# ----------------------------------------------------------------------------------------------------------------
# Frozen encoder
# ----------------------------------------------------------------------------------------------------------------

def create_clip(name, pretrained=None, device="cpu"):
    """open_clip model by name; pretrained = tag (downloads), local weights file, or None (random weights)."""
    if name not in open_clip.list_models():
        raise data.UsageError(f"unknown open_clip model {name!r}; use one of open_clip.list_models(), e.g. ViT-B-16 or glyph-clip")
    if pretrained is None:
        warnings.warn(f"encoder {name} has random weights (pass pretrained= a tag or a weights file)")
    elif pretrained in open_clip.list_pretrained_tags_by_model(name):
        try:
            return open_clip.create_model(name, pretrained=pretrained, device=device)
        except RuntimeError as e:
            raise data.UsageError(f"could not download {name} weights {pretrained!r} ({e}); "
                                  "pass a local weights file instead (python encoder.py --train makes one)") from e
    elif not os.path.isfile(pretrained):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise data.UsageError(f"weights {pretrained!r} are neither a file nor a pretrained tag of {name} (tags: {tags}); "
                              "train them with: python encoder.py --train")
    return open_clip.create_model(name, pretrained=pretrained, device=device)


class Encoder(torch.nn.Module):
    """Frozen open_clip encoder: pooled embeddings, patch-token maps and per-level crop features of images in [-1, 1]."""

    def __init__(self, name="ViT-B-16", pretrained=None, device="cpu", batch_size=256):
        super().__init__()
        self.model = create_clip(name, pretrained, device).requires_grad_(False).eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        self.batch_size = batch_size  # images per forward pass inside embed/token_map
        visual = self.model.visual
        cfg = visual.preprocess_cfg
        self.register_buffer("mean", torch.tensor(cfg["mean"], device=device).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"], device=device).view(1, 3, 1, 1), persistent=False)
        self.dim = visual.output_dim  # joint embedding dim D
        self.image_size = visual.image_size[0]
        self.grid = visual.grid_size[0]
        self.text_shape = tuple(self.encode_text([""]).shape[1:])  # (context_length, text width)
        self.caption_states = {}  # caption -> (context_length, text width): the caption cache of cached_text

    def train(self, mode=True):
        """The encoder stays in eval mode (frozen), even inside a parent module that is put in training mode."""
        return super().train(False)

    def _batched(self, fn, x):
        """Apply fn to preprocessed chunks of x and concatenate."""
        outs = [fn(preprocess(xb.to(self.mean.device), self.image_size, self.mean, self.std))
                for xb in x.split(self.batch_size)]
        return torch.cat(outs)

    @torch.no_grad()
    def embed(self, x):
        """Pooled, projected image embedding (B, D) of images (B, C, H, W) in [-1, 1] (CLIP `encode_image`)."""
        return self._batched(self.model.encode_image, x)

    @torch.no_grad()
    def token_map(self, x):
        """Patch tokens after the final norm, projected into the joint space: (B, D, grid, grid)."""
        return self._embed_and_tokens(x)[1]

    @torch.no_grad()
    def level_features(self, x, M, min_crop=64):
        """Features of an M x M latent level (B, D, M, M) (paper §2.2): each crop encoded separately when crops are
        at least min_crop px, else the patch-token map average-pooled to M x M. M = 1 is the whole-image embedding."""
        return self.features(x, [M], min_crop)[M]

    @torch.no_grad()
    def features(self, x, grids, min_crop=64):
        """level_features for several grids {M: (B, D, M, M)}; one encoder pass serves the whole-image embedding
        and every pooled token-map level, so building a depth-5 cache costs one pass plus the crop passes."""
        B, H = x.shape[0], x.shape[2]
        crops = [M for M in grids if M > 1 and H // M >= min_crop]
        out = {}
        if len(crops) < len(grids):
            emb, tokens = self._embed_and_tokens(x)                      # (B, D), (B, D, grid, grid)
            out = {M: emb[:, :, None, None] if M == 1 else F.adaptive_avg_pool2d(tokens, M)
                   for M in grids if M not in crops}
        for M in crops:
            f = self.embed(crop_grid(x, M))  # (B*M*M, D)
            out[M] = f.reshape(B, M, M, self.dim).permute(0, 3, 1, 2)
        return out

    def _embed_and_tokens(self, x):
        """Pooled embedding (B, D) and projected patch-token map (B, D, grid, grid) from one forward pass."""
        visual = self.model.visual

        def both(xb):
            out = visual.forward_intermediates(xb, indices=1, normalize_intermediates=True, intermediates_only=False,
                                               output_fmt="NLC")
            tokens = out["image_intermediates"][-1] @ visual.proj  # (b, grid*grid, D)
            return torch.cat([out["image_features"][:, None], tokens], 1)  # (b, 1 + grid*grid, D)

        t = self._batched(both, x)
        return t[:, 0], t[:, 1:].transpose(1, 2).reshape(len(x), self.dim, self.grid, self.grid)

    @torch.no_grad()
    def encode_text(self, captions):
        """Text-tower token states after the final norm: (B, context_length, width)."""
        tokens = self.tokenizer(list(captions)).to(self.mean.device)
        out = self.model.forward_intermediates(text=tokens, text_indices=1, normalize_intermediates=True,
                                               intermediates_only=True)
        return out["text_intermediates"][-1]

    @torch.no_grad()
    def cache_captions(self, captions, chunk=256):
        """Fill the caption cache: the captions not in it yet, sorted, through the text tower in chunks of
        ``chunk``. Filled once with every caption of a training split, what is stored depends on that split
        alone, not on the order batches came in (a resumed run reads the same states). Memory: one
        (context_length, width) float32 array per caption, 0.4 GB for the glyph set's 17k distinct definitions
        (COCO's 414k captions at ViT-B/16's 77 x 512 would need 65 GB)."""
        todo = sorted(set(captions) - self.caption_states.keys())
        for k in tqdm(range(0, len(todo), chunk), desc="caption cache", unit="chunk", disable=len(todo) <= chunk):
            part = todo[k:k + chunk]
            for caption, states in zip(part, self.encode_text(part)):
                self.caption_states[caption] = states.clone()                       # (context_length, width)

    def cached_text(self, captions):
        """encode_text through the caption cache: the frozen text tower runs once per distinct caption (a caption
        not cached yet is encoded on first use), later batches read the stored states, so a text-conditional
        step pays for its text tokens but not for the tower. (B, context_length, width)."""
        self.cache_captions(captions)
        return torch.stack([self.caption_states[c] for c in captions])

    @torch.no_grad()
    def embed_text(self, captions):
        """Pooled, projected text embedding (B, D) (CLIP `encode_text`)."""
        return self.model.encode_text(self.tokenizer(list(captions)).to(self.mean.device))


# ----------------------------------------------------------------------------------------------------------------
# Offline CLIP training on glyph/definition pairs
# ----------------------------------------------------------------------------------------------------------------

def make_optimizer(model, lr, weight_decay):
    """AdamW with weight decay on matrices only (open_clip's rule: no decay on gains, biases and logit_scale)."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "logit_scale" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98), eps=1e-6)


def cosine_lr(step, progress, lr, warmup):
    """Linear warm-up over the first `warmup` steps times a cosine decay to 0 over progress in [0, 1]."""
    return lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def clip_step(model, opt, loss_fn, x, tokens, mean, std):
    """One contrastive step on a batch of images (B, C, H, W) in [-1, 1] and their caption tokens; returns the loss."""
    model.train()
    image_size = model.visual.image_size[0]
    img, txt, scale = model(preprocess(x, image_size, mean, std), tokens)  # L2-normalised features, exp(logit_scale)
    loss = loss_fn(img, txt, scale)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))  # CLIP caps the temperature at 100
    return loss.item()


def save_atomic(obj, path):
    """torch.save to a temp file next to path, then rename (never leaves a half-written checkpoint)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data.atomic_write(path, lambda tmp: torch.save(obj, tmp))


def train_clip(args):
    """Train args.name on (image, caption) pairs of args.data with ClipLoss; save an open_clip checkpoint to args.out."""
    ds = data.build_dataset(args.data, "train", args.image_size, data_dir=args.data_dir)
    if not ds.has_captions:
        raise data.UsageError(f"--data {args.data} has no captions; CLIP training needs captions (use glyphs or coco)")
    torch.manual_seed(args.seed)
    model = open_clip.create_model(args.name)
    tokenizer = open_clip.get_tokenizer(args.name)
    mean = torch.tensor(model.visual.preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.preprocess_cfg["std"]).view(1, 3, 1, 1)
    opt = make_optimizer(model, args.lr, args.weight_decay)
    loss_fn = open_clip.loss.ClipLoss()
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, drop_last=True)
    start, step, batches = time.time(), 0, iter(())
    bar = tqdm(total=args.steps, desc="glyph-clip", dynamic_ncols=True)
    while step < args.steps:
        elapsed = time.time() - start
        if args.minutes and elapsed > 60 * args.minutes:
            break
        # the decay follows whichever budget ends first, so a wall-clock cap still anneals the lr to 0
        progress = max(step / args.steps, elapsed / (60 * args.minutes) if args.minutes else 0.0)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, progress, args.lr, warmup=max(1, args.steps // 20))
        batch = next(batches, None)
        if batch is None:
            batches = iter(loader)
            batch = next(batches)
        x, _, captions = batch
        loss = clip_step(model, opt, loss_fn, x, tokenizer(list(captions)), mean, std)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{opt.param_groups[0]['lr']:.1e}")
    bar.close()
    minutes = (time.time() - start) / 60
    # {"state_dict": ...} is read by open_clip.create_model(name, pretrained=path) like a downloaded weights file
    save_atomic({"state_dict": model.state_dict(), "args": vars(args), "step": step}, args.out)
    print(f"trained {args.name} for {step} steps in {minutes:.1f} min; saved {args.out}")


def glyph_features(enc, ds, batch_size=1024):
    """Embeddings (N, D) and labels (N,) of a whole dataset."""
    feats, labels = [], []
    for x, y, _ in tqdm(torch.utils.data.DataLoader(ds, batch_size=batch_size), desc="embed", leave=False):
        feats.append(enc.embed(x))
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def knn_report(args, pretrained):
    """Print KNN (K = 20) top-1/top-5 accuracy on the test split: random weights (same seed) vs `pretrained`."""
    import evaluate  # imported late: only this report needs it

    train_ds = data.build_dataset(args.data, "train", args.image_size, data_dir=args.data_dir)
    test_ds = data.build_dataset(args.data, "test", args.image_size, data_dir=args.data_dir)
    if train_ds.num_classes == 0:
        raise data.UsageError(f"--data {args.data} has no class labels; KNN accuracy needs them (use glyphs)")
    encoders = {}
    for label, weights in (("trained", pretrained), ("random", None)):  # a bad weights path fails before any work
        torch.manual_seed(args.seed)  # the random row is the trained run's initialisation
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            encoders[label] = Encoder(args.name, weights)
    rows = []
    for label in ("random", "trained"):
        enc = encoders[label]
        train_f, train_y = glyph_features(enc, train_ds)
        test_f, test_y = glyph_features(enc, test_ds)
        rows.append((label, *evaluate.knn_accuracy(train_f, train_y, test_f, test_y, k=20)))
    print(f"KNN radical accuracy, K=20, {len(test_ds)} held-out {args.data} vs {len(train_ds)} train ({args.name})")
    print(f"{'weights':<10}{'top1':>8}{'top5':>8}")
    for label, top1, top5 in rows:
        print(f"{label:<10}{top1:>8.4f}{top5:>8.4f}")
    return rows


def main(args):
    p = argparse.ArgumentParser(description="Train the offline glyph CLIP (--train) or compare its KNN accuracy "
                                            "with random weights (--knn).")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--train", action="store_true", help="train a small CLIP with ClipLoss, then report KNN accuracy")
    mode.add_argument("--knn", action="store_true", help="report KNN accuracy of --pretrained vs random weights")
    p.add_argument("--name", default="glyph-clip", help="open_clip model name (glyph-clip is registered by this file)")
    p.add_argument("--pretrained", default=None, help="--knn: weights file (or open_clip tag) to evaluate")
    p.add_argument("--data", default="glyphs", help="captioned dataset (data.build_dataset name)")
    p.add_argument("--data-dir", default="data", help="where datasets are cached")
    p.add_argument("--image-size", type=int, default=32, help="glyph render size in px (resized to the model input)")
    p.add_argument("--steps", type=int, default=500, help="training steps (500 take about 14 min on 2 free CPU cores)")
    p.add_argument("--minutes", type=float, default=0, help="optional wall-clock cap on training in minutes (0: none); "
                                                              "the lr decay follows whichever of steps/minutes ends first")
    p.add_argument("--batch-size", type=int, default=256, help="pairs per contrastive batch")
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW peak learning rate (warm-up over 5%% of --steps, cosine decay)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on weight matrices")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation (the random-weights baseline too)")
    p.add_argument("--out", default="checkpoints/glyph-clip.pt", help="--train: where to save the weights")
    args = p.parse_args(args)
    if args.train:
        train_clip(args)
        return knn_report(args, args.out)
    if args.pretrained is None:
        raise data.UsageError("--knn needs --pretrained PATH (e.g. checkpoints/glyph-clip.pt from --train)")
    return knn_report(args, args.pretrained)


if __name__ == "__main__":
    data.run_main(main, sys.argv[1:])
