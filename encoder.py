"""Frozen visual encoders on patchified images: the crop operator C(x, M) and the per-level features z_l = E(C(x, M)).

Paper §3.3 (z_l = E(C(x, M)), M = 2^(L-l) in the experiments, §4.1) and shared/paper.md §2.1-2.2:
- each of the M*M crops of size H/M is encoded separately (the pooled image embedding);
- when a crop would be smaller than 64 px, the backbone's patch-token map (after the final norm) is average-pooled to
  M x M instead.
Two encoders, as in the paper (§2.1 table), and an ablation's stand-in:
- `Encoder`: any open_clip model, the paper's COCO encoder (CLIP ViT-B/16: `Encoder("ViT-B-16", "laion2b_s34b_b88k")`,
  needs internet); embedding = CLIP's `encode_image`, token map projected into the joint space. It has a text tower.
- `MoCoV3Encoder`: a timm ViT loaded from a MoCo-v3 checkpoint (Chen, Xie, He 2021; the official `vit-b-300ep.pth.tar`
  or one written by train_encoder.py), the paper's ImageNet encoder; ImageNet mean/std, embedding = the [CLS] token
  after the final norm (768-d for ViT-B/16), token map = the patch tokens after the final norm.
- `PixelEncoder`: no network, each crop's pixels as a 16 x 16 thumbnail (the README's encoder ablation).
Offline, no pretrained weights can be downloaded: train_encoder.py trains either network on local images.
"""
import json
import logging
import os
import tempfile
import warnings

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from tqdm import tqdm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import VisionTransformer

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

class WeightsUnavailable(data.UsageError):
    """Pretrained weights named by a hub tag could not be downloaded (offline)."""


def create_clip(name, pretrained=None, device="cpu"):
    """open_clip model by name; pretrained = tag (downloads), local weights file, or None (random weights)."""
    if name not in open_clip.list_models():
        raise data.UsageError(f"unknown open_clip model {name!r}; use one of open_clip.list_models(), e.g. ViT-B-16 or glyph-clip")
    if pretrained is None:
        warnings.warn(f"encoder {name} has random weights (pass pretrained= a tag or a weights file)")
    elif pretrained in open_clip.list_pretrained_tags_by_model(name):
        logging.disable(logging.ERROR)  # open_clip logs the failed download too; the error below says it in one line
        try:
            return open_clip.create_model(name, pretrained=pretrained, device=device)
        except RuntimeError as e:
            raise WeightsUnavailable(f"could not download {name} weights {pretrained!r} from the model hub") from e
        finally:
            logging.disable(logging.NOTSET)
    elif not os.path.isfile(pretrained):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise data.UsageError(f"weights {pretrained!r} are neither a file nor a pretrained tag of {name} (tags: {tags}); "
                              "train them with: python train_encoder.py --objective clip --train")
    return open_clip.create_model(name, pretrained=pretrained, device=device)


class FrozenEncoder(torch.nn.Module):
    """Shared frozen-encoder logic: batching, the per-level crop / pooled-token features. A subclass sets
    image_size, grid, dim, mean, std and implements _embed(x) and _embed_and_tokens(x) on preprocessed chunks."""

    text_shape = None  # (context_length, width) of the text tower, for encoders that have one

    def __init__(self, mean, std, device, batch_size):
        super().__init__()
        self.batch_size = batch_size  # images per forward pass inside embed/token_map
        self.register_buffer("mean", torch.tensor(mean, device=device).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, device=device).view(1, 3, 1, 1), persistent=False)

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
        """Pooled image embedding (B, D) of images (B, C, H, W) in [-1, 1]."""
        return self._batched(self._embed, x)

    @torch.no_grad()
    def token_map(self, x):
        """Patch tokens after the final norm (projected into the joint space for CLIP): (B, D, grid, grid)."""
        return self._tokens(x)[1]

    def _tokens(self, x):
        """Pooled embedding (B, D) and patch-token map (B, D, grid, grid) from one forward pass per chunk."""
        t = self._batched(self._embed_and_tokens, x)  # (B, 1 + grid*grid, D)
        return t[:, 0], t[:, 1:].transpose(1, 2).reshape(len(x), self.dim, self.grid, self.grid)

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
            emb, tokens = self._tokens(x)                                # (B, D), (B, D, grid, grid)
            out = {M: emb[:, :, None, None] if M == 1 else F.adaptive_avg_pool2d(tokens, M)
                   for M in grids if M not in crops}
        for M in crops:
            f = self.embed(crop_grid(x, M))  # (B*M*M, D)
            out[M] = f.reshape(B, M, M, self.dim).permute(0, 3, 1, 2)
        return out


class Encoder(FrozenEncoder):
    """Frozen open_clip encoder: pooled embeddings, patch-token maps and per-level crop features of images in [-1, 1],
    and the text tower's token states."""

    def __init__(self, name="ViT-B-16", pretrained=None, device="cpu", batch_size=256):
        model = create_clip(name, pretrained, device).requires_grad_(False).eval()
        cfg = model.visual.preprocess_cfg
        super().__init__(cfg["mean"], cfg["std"], device, batch_size)
        self.model = model
        self.tokenizer = open_clip.get_tokenizer(name)
        visual = self.model.visual
        self.dim = visual.output_dim  # joint embedding dim D
        self.image_size = visual.image_size[0]
        self.grid = visual.grid_size[0]
        self.text_shape = tuple(self.encode_text([""]).shape[1:])  # (context_length, text width)
        self.caption_states = {}  # caption -> (context_length, text width): the caption cache of cached_text
        self.caption_embeddings = {}  # caption -> (D,): the cache of cached_text(pooled=True)

    def _embed(self, xb):
        return self.model.encode_image(xb)  # (b, D)

    def _embed_and_tokens(self, xb):
        """Pooled embedding and projected final-norm patch tokens: (b, 1 + grid*grid, D)."""
        visual = self.model.visual
        out = visual.forward_intermediates(xb, indices=1, normalize_intermediates=True, intermediates_only=False,
                                           output_fmt="NLC")
        tokens = out["image_intermediates"][-1] @ visual.proj  # (b, grid*grid, D)
        return torch.cat([out["image_features"][:, None], tokens], 1)

    @torch.no_grad()
    def encode_text(self, captions):
        """Text-tower token states after the final norm: (B, context_length, width)."""
        tokens = self.tokenizer(list(captions)).to(self.mean.device)
        out = self.model.forward_intermediates(text=tokens, text_indices=1, normalize_intermediates=True,
                                               intermediates_only=True)
        return out["text_intermediates"][-1]

    @torch.no_grad()
    def cache_captions(self, captions, pooled=False, chunk=256):
        """Fill the caption cache: the captions not in it yet, sorted, through the text tower in chunks of
        ``chunk``; their token states (encode_text), or with ``pooled`` their pooled embeddings (embed_text).
        Filled once with every caption of a training split, what is stored depends on that split alone, not on
        the order batches came in (a resumed run reads the same states). Memory: one (context_length, width)
        float32 array per caption, 0.4 GB for the glyph set's 17k distinct definitions (COCO's 414k captions
        at ViT-B/16's 77 x 512 would need 65 GB); pooled, one D-vector (9 MB for the glyphs, 0.8 GB for COCO)."""
        store, encode = (self.caption_embeddings, self.embed_text) if pooled else (self.caption_states, self.encode_text)
        todo = sorted(set(captions) - store.keys())
        for k in tqdm(range(0, len(todo), chunk), desc="caption cache", unit="chunk", disable=len(todo) <= chunk):
            part = todo[k:k + chunk]
            for caption, states in zip(part, encode(part)):
                store[caption] = states.clone()                     # (context_length, width), pooled (D,)

    def cached_text(self, captions, pooled=False):
        """encode_text (embed_text with ``pooled``) through the caption cache: the frozen text tower runs once per
        distinct caption (a caption not cached yet is encoded on first use), later batches read the stored states,
        so a text-conditional step pays for its text tokens but not for the tower. (B, context_length, width),
        pooled (B, D)."""
        self.cache_captions(captions, pooled)
        store = self.caption_embeddings if pooled else self.caption_states
        return torch.stack([store[c] for c in captions])

    @torch.no_grad()
    def embed_text(self, captions):
        """Pooled, projected text embedding (B, D) (CLIP `encode_text`: the end-of-text token's final state
        through the text projection), what --text-path adaln feeds the denoiser."""
        return self.model.encode_text(self.tokenizer(list(captions)).to(self.mean.device))


# ----------------------------------------------------------------------------------------------------------------
# MoCo-v3 ViT (Chen, Xie, He 2021)
# ----------------------------------------------------------------------------------------------------------------

# timm VisionTransformer sizes. B/16 and S/16 are MoCo-v3's vit_base / vit_small (12 heads in both, as in its vits.py);
# "glyph" is a 32 px ViT with 8x8 patch tokens (like ViT-B/16's 14x14 at 224 px) that 2 CPU cores train in minutes;
# "tiny" is for tests.
VITS = {
    "B/16": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "S/16": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=12),
    "glyph": dict(img_size=32, patch_size=4, embed_dim=192, depth=4, num_heads=3),
    "tiny": dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2),
}
MOCO_ARCHS = {"vit_base": "B/16", "vit_small": "S/16"}  # the "arch" field of official MoCo-v3 checkpoints
MOCO_PREFIX = "module.base_encoder."                     # backbone keys in MoCo-v3 checkpoints (DDP-wrapped)


def sincos_pos_embed(grid, dim, temperature=10000.0):
    """MoCo-v3's fixed 2-D sin-cos position embedding (its vits.py), with a zero entry for [CLS]: (1, 1 + grid², dim).
    Per patch token (row-major): sin and cos of its row index, then of its column index, times dim/4 frequencies
    (the official code calls the row index w: its meshgrid indexes 'ij')."""
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                                indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))  # (dim/4,)
    r, c = rows.flatten()[:, None] * omega, cols.flatten()[:, None] * omega                 # (grid², dim/4)
    pos = torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], 1)                                 # (grid², dim)
    return torch.cat([torch.zeros(1, dim), pos])[None]


def build_vit(cfg):
    """A timm ViT backbone without a head (num_classes=0) with MoCo-v3's frozen sin-cos position embedding."""
    model = VisionTransformer(num_classes=0, **cfg)
    model.pos_embed.data.copy_(sincos_pos_embed(cfg["img_size"] // cfg["patch_size"], cfg["embed_dim"]))
    model.pos_embed.requires_grad_(False)
    return model


def read_mocov3(path):
    """(ViT config, backbone state dict) of a MoCo-v3 checkpoint: {"state_dict": {"module.base_encoder.*": ...}};
    the projection head is dropped. The config is the file's "vit" entry (train_encoder.py writes it), else its
    "arch" (official checkpoints: vit_small, vit_base), else ViT-B/16."""
    if not os.path.isfile(path):
        raise data.UsageError(f"MoCo-v3 weights {path!r} not found; pass the official vit-b-300ep.pth.tar or train "
                              "one with: python train_encoder.py --objective mocov3 --train --data DATA")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        state = ckpt["state_dict"]
    except (RuntimeError, KeyError, TypeError, OSError) as e:
        raise data.UsageError(f"{path} is not a MoCo-v3 checkpoint ({type(e).__name__}: {e})") from e
    backbone = {k[len(MOCO_PREFIX):]: v for k, v in state.items()
                if k.startswith(MOCO_PREFIX) and not k.startswith(MOCO_PREFIX + "head.")}
    if not backbone:
        raise data.UsageError(f"{path} has no {MOCO_PREFIX}* weights; is it a MoCo-v3 checkpoint?")
    cfg = ckpt.get("vit") or VITS[MOCO_ARCHS.get(ckpt.get("arch"), "B/16")]
    return dict(cfg), backbone


class MoCoV3Encoder(FrozenEncoder):
    """Frozen MoCo-v3 ViT: [CLS] after the final norm as the embedding, final-norm patch tokens as the token map."""

    def __init__(self, pretrained=None, device="cpu", batch_size=256, vit="B/16"):
        """pretrained: a MoCo-v3 checkpoint file (its ViT config is read from it), or None: random weights of a ViT
        of size `vit` (a VITS name or config dict)."""
        super().__init__(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, device, batch_size)
        if pretrained is None:
            warnings.warn(f"MoCo-v3 encoder ViT {vit} has random weights (pass pretrained= a checkpoint file)")
            cfg, state = VITS[vit] if isinstance(vit, str) else vit, None
        else:
            cfg, state = read_mocov3(pretrained)
        self.model = build_vit(cfg)
        if state is not None:
            try:
                self.model.load_state_dict(state)
            except RuntimeError as e:
                raise data.UsageError(f"{pretrained} does not fit a ViT {cfg} ({str(e).splitlines()[0]})") from e
        self.model.requires_grad_(False).eval().to(device)
        self.cfg = cfg
        self.dim = cfg["embed_dim"]
        self.image_size = cfg["img_size"]
        self.grid = cfg["img_size"] // cfg["patch_size"]

    def _embed(self, xb):
        return self.model.forward_features(xb)[:, 0]  # (b, D): [CLS] after the final norm

    def _embed_and_tokens(self, xb):
        return self.model.forward_features(xb)  # (b, 1 + grid*grid, D): [CLS] and patch tokens after the final norm


class PixelEncoder(FrozenEncoder):
    """No network (an ablation, not the paper's): a crop's features are its own pixels as a greyscale ``side`` x
    ``side`` thumbnail, D = side². Every level is encoded from its crops, however small (C(x, M) of §3.3 with no
    minimum), so z_1x1 is the PCA of the whole image's thumbnail and z_MxM that of each cell's. It asks whether the
    glyph CLIP limits the hierarchy: raw pixels find a glyph's radical better than its features do (KNN, README)."""

    def __init__(self, device="cpu", batch_size=256, side=16):
        super().__init__((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), device, batch_size)  # preprocess then gives [-1, 1] back
        self.dim, self.image_size, self.grid = side * side, side, 1

    def _embed(self, xb):
        return xb.mean(1).flatten(1)  # (b, side²): grey

    def _embed_and_tokens(self, xb):
        e = self._embed(xb)[:, None]  # (b, 1, D)
        return torch.cat([e, e], 1)   # the embedding and a 1x1 token map

    def features(self, x, grids, min_crop=64):
        return super().features(x, grids, min_crop=1)  # always the crops: pixels cost nothing to encode


# ----------------------------------------------------------------------------------------------------------------
# Feature quality (paper Table 5)
# ----------------------------------------------------------------------------------------------------------------

def _on(a, dtype, device):
    """A tensor, numpy array or list as a tensor of ``dtype`` on ``device``."""
    return torch.as_tensor(a if torch.is_tensor(a) else np.asarray(a), dtype=dtype).to(device)


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, k=20, temperature=0.07, chunk_size=1024,
                 device="cpu"):
    """(top-1, top-5) accuracy in [0, 1] of DINO's weighted KNN: cosine similarity to the training
    features, the k nearest each add exp(sim / T) to their class, the best-scored classes are predicted."""
    train = F.normalize(_on(train_feats, torch.float32, device), dim=1)  # (N, D)
    test = F.normalize(_on(test_feats, torch.float32, device), dim=1)    # (Q, D)
    train_y = _on(train_labels, torch.long, device)                      # (N,)
    test_y = _on(test_labels, torch.long, device)                        # (Q,)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    k, top = min(k, len(train)), min(5, num_classes)
    hits1 = hits5 = 0
    for start in range(0, len(test), chunk_size):
        sim, idx = (test[start:start + chunk_size] @ train.T).topk(k, dim=1)  # (b, k) each
        votes = torch.zeros(len(sim), num_classes, device=device).scatter_add_(1, train_y[idx], (sim / temperature).exp())  # (b, classes)
        hit = votes.topk(top, dim=1).indices == test_y[start:start + chunk_size, None]  # (b, top)
        hits1 += hit[:, 0].sum().item()
        hits5 += hit.any(dim=1).sum().item()
    return hits1 / len(test), hits5 / len(test)
