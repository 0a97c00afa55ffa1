"""Encoder training, offline: the MoCo-v3 objective on images alone (any dataset), or CLIP on captioned images.

The paper's encoders are pretrained (shared/paper.md §2.1: MoCo-v3 ViT-B/16 for ImageNet, CLIP ViT-B/16 for COCO) and
frozen (encoder.py). Offline none can be downloaded, so this script trains one:

- ``--objective mocov3`` (Chen, Xie, He 2021, §3; the paper's ImageNet encoder): two augmented views of each image, a
  query encoder (ViT + projection MLP + prediction MLP) and a momentum encoder (ViT + projection MLP, an exponential
  moving average of the query's), and the symmetric InfoNCE loss ctr(q1, k2) + ctr(q2, k1) with temperature τ.
  Images alone, so it works on any dataset: glyphs, imagenet, folder:PATH. Saved in MoCo-v3's checkpoint format
  (``module.base_encoder.*``), which ``encoder.MoCoV3Encoder`` (``--encoder mocov3 --pretrained FILE``) reads.
- ``--objective clip`` (Radford et al. 2021): a small CLIP ("glyph-clip") on glyph/definition pairs with
  ``open_clip.loss.ClipLoss``; needs captions (glyphs, coco).

Both end with the KNN report (K = 20, the metric of paper Table 5): top-1/top-5 accuracy of the test split's embeddings
against the training split's (labels: glyph radicals, or class folders), for the trained weights and for the same
network at its initialisation (random weights).

    python train_encoder.py --objective mocov3 --train --data glyphs --steps 2000 --out checkpoints/mocov3-glyphs.pt
    python train_encoder.py --objective clip --train --data glyphs       # the glyph CLIP (checkpoints/glyph-clip.pt)
    python train_encoder.py --objective mocov3 --knn --pretrained checkpoints/mocov3-glyphs.pt
"""
import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import open_clip
import timm
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

import data
import encoder
import hierarchy
from encoder import preprocess

# ----------------------------------------------------------------------------------------------------------------
# Offline CLIP training on glyph/definition pairs
# ----------------------------------------------------------------------------------------------------------------

def make_optimizer(model, lr, weight_decay):
    """AdamW with weight decay on matrices only (open_clip's rule: no decay on gains, biases and logit_scale)."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "logit_scale" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98), eps=1e-6)


def plain_attention(model, device, precision):
    """At set-up, for bf16 on the CPU, where torch's flash attention kernel is slow (denoiser.Attention): timm's
    ViT attention (``fused_attn``) computed as plain matmuls and a softmax; returns the model."""
    if precision == "bf16" and device.type == "cpu":
        for module in model.modules():
            if hasattr(module, "fused_attn"):  # timm's Attention
                module.fused_attn = False
    return model


def autocast(device, precision):
    """The context of one training step at ``precision``: nothing for fp32, else bf16 autocast; on the CPU any
    F.scaled_dot_product_attention left (open_clip's) runs torch's math kernel (see plain_attention)."""
    stack = contextlib.ExitStack()
    if precision == "bf16":
        if device.type == "cpu":
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
    return stack


def cosine_lr(step, progress, lr, warmup):
    """Linear warm-up over the first `warmup` steps times a cosine decay to 0 over progress in [0, 1]."""
    return lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def clip_step(model, opt, loss_fn, x, tokens, mean, std, precision="fp32"):
    """One contrastive step on a batch of images (B, C, H, W) in [-1, 1] and their caption tokens; returns the loss."""
    model.train()
    image_size = model.visual.image_size[0]
    with autocast(x.device, precision):
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
    """Train args.clip on (image, caption) pairs of args.data with ClipLoss; save an open_clip checkpoint to args.out."""
    ds = data.build_dataset(args.data, "train", args.image_size, data_dir=args.data_dir)
    if not ds.has_captions:
        raise data.UsageError(f"--data {args.data} has no captions; CLIP training needs captions (use glyphs or coco)")
    torch.manual_seed(args.seed)
    model = open_clip.create_model(args.clip).to(args.device)  # initialised on the CPU: the same weights on any device
    plain_attention(model, torch.device(args.device), args.precision)
    tokenizer = open_clip.get_tokenizer(args.clip)
    mean = torch.tensor(model.visual.preprocess_cfg["mean"], device=args.device).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.preprocess_cfg["std"], device=args.device).view(1, 3, 1, 1)
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
        loss = clip_step(model, opt, loss_fn, x.to(args.device), tokenizer(list(captions)).to(args.device), mean, std,
                         args.precision)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{opt.param_groups[0]['lr']:.1e}")
    bar.close()
    minutes = (time.time() - start) / 60
    # {"state_dict": ...} is read by open_clip.create_model(name, pretrained=path) like a downloaded weights file
    save_atomic({"state_dict": model.state_dict(), "args": vars(args), "step": step}, args.out)
    print(f"trained {args.clip} for {step} steps in {minutes:.1f} min; saved {args.out}")


# ----------------------------------------------------------------------------------------------------------------
# MoCo-v3 (Chen, Xie, He 2021, §3 and its official code, facebookresearch/moco-v3)
# ----------------------------------------------------------------------------------------------------------------

def mlp(num_layers, in_dim, hidden_dim, out_dim, last_bn=True):
    """MoCo-v3's heads: Linear (no bias) + BN + ReLU per hidden layer; a final BN without affine on the projector."""
    layers = []
    for i in range(num_layers):
        d_in, d_out = in_dim if i == 0 else hidden_dim, out_dim if i == num_layers - 1 else hidden_dim
        layers.append(torch.nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [torch.nn.BatchNorm1d(d_out), torch.nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(torch.nn.BatchNorm1d(d_out, affine=False))
    return torch.nn.Sequential(*layers)


class MoCo(torch.nn.Module):
    """Query encoder f_q = ViT + projector (3-layer MLP), predictor (2-layer MLP), momentum encoder f_k = EMA of f_q.
    Attribute names give the official checkpoint keys: base_encoder.*, momentum_encoder.*, predictor.*."""

    def __init__(self, vit_cfg, mlp_dim=4096, dim=256):
        super().__init__()
        self.vit_cfg = vit_cfg
        self.base_encoder = encoder.build_vit(vit_cfg)  # first, so its init is the KNN report's random weights
        self.base_encoder.head = mlp(3, vit_cfg["embed_dim"], mlp_dim, dim)  # timm applies .head after the [CLS] pool
        self.base_encoder.patch_embed.requires_grad_(False)  # MoCo-v3 §4: a frozen random patch projection (stability)
        self.momentum_encoder = copy.deepcopy(self.base_encoder).requires_grad_(False)
        self.predictor = mlp(2, dim, mlp_dim, dim, last_bn=False)

    def forward(self, x1, x2, m, temperature):
        """Symmetric loss of two views (B, 3, S, S) after the momentum update with coefficient m."""
        q1, q2 = self.predictor(self.base_encoder(x1)), self.predictor(self.base_encoder(x2))  # (B, dim) each
        with torch.no_grad():
            momentum_update(self.momentum_encoder, self.base_encoder, m)
            k1, k2 = self.momentum_encoder(x1), self.momentum_encoder(x2)
        return symmetric_loss(q1, q2, k1, k2, temperature)


def contrastive_loss(q, k, temperature):
    """MoCo-v3's InfoNCE ctr(q, k): the positive of q_i is k_i, the other keys of the batch are negatives;
    scaled by 2τ as in the official code (q, k: (B, dim), L2-normalised here)."""
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / temperature  # (B, B)
    return F.cross_entropy(logits, torch.arange(len(q), device=q.device)) * (2 * temperature)


def symmetric_loss(q1, q2, k1, k2, temperature):
    """ctr(q1, k2) + ctr(q2, k1) (MoCo-v3 §3, Algorithm 1)."""
    return contrastive_loss(q1, k2, temperature) + contrastive_loss(q2, k1, temperature)


@torch.no_grad()
def momentum_update(momentum, base, m):
    """θ_k <- m θ_k + (1 - m) θ_q over the parameters (BN statistics are each encoder's own)."""
    for pk, pq in zip(momentum.parameters(), base.parameters()):
        pk.mul_(m).add_(pq.detach(), alpha=1 - m)


def momentum_at(progress, m0):
    """MoCo-v3's momentum schedule: m0 raised to 1 by a half cosine over training (progress in [0, 1])."""
    return 1 - 0.5 * (1 + math.cos(math.pi * progress)) * (1 - m0)


def augment(x, g, size, crop_min=0.08, degrees=10.0, shear=0.1, jitter=0.4, grey=0.2):
    """A random view of each image x (B, C, H, W) in [-1, 1] -> (B, C, size, size), batched and cheap on CPU:
    random resized crop (area in [crop_min, 1], aspect in [3/4, 4/3]) with a small rotation and shear, as one affine
    resampling (bilinear; edges replicated), then brightness/contrast jitter and, for colour images, random grey.
    MoCo-v3's blur, solarisation and hue/saturation jitter are left out; no flips (mirrored glyphs are other glyphs).
    All randomness comes from the CPU generator g."""
    B, C = x.shape[:2]
    u = torch.rand(B, 9, generator=g).to(x.device)  # (B, 9) uniforms
    area = crop_min + (1 - crop_min) * u[:, 0]
    ratio = torch.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[:, 1])
    w, h = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)  # crop size, fraction of the side
    cx, cy = (1 - w) * (2 * u[:, 2] - 1), (1 - h) * (2 * u[:, 3] - 1)               # crop centre in [-1, 1]
    a = math.radians(degrees) * (2 * u[:, 4] - 1)
    s = shear * (2 * u[:, 5] - 1)
    rot = torch.stack([torch.stack([a.cos(), -a.sin() + s * a.cos()], 1),
                       torch.stack([a.sin(), a.cos() + s * a.sin()], 1)], 1)         # (B, 2, 2): rotation @ shear
    theta = torch.cat([rot * torch.stack([w, h], 1)[:, None, :], torch.stack([cx, cy], 1)[:, :, None]], 2)  # (B, 2, 3)
    grid = F.affine_grid(theta, (B, C, size, size), align_corners=False)
    v = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)  # (B, C, size, size)
    v = (v + 1) / 2                                                                          # [0, 1]
    brightness = 1 + jitter * (2 * u[:, 6] - 1)
    contrast = 1 + jitter * (2 * u[:, 7] - 1)
    mean = v.mean((1, 2, 3), keepdim=True)
    v = ((v - mean) * contrast.view(B, 1, 1, 1) + mean) * brightness.view(B, 1, 1, 1)
    if C == 3:
        to_grey = (u[:, 8] < grey).view(B, 1, 1, 1)
        v = torch.where(to_grey, v.mean(1, keepdim=True).expand_as(v), v)
    return v.clamp(0, 1) * 2 - 1


class StepBatches(torch.utils.data.Sampler):
    """Batch indices of steps start … steps-1: epoch e is a permutation seeded by (seed, e), batches drop the remainder.
    A step's batch depends on (seed, step) alone, so a resumed run reads exactly what an uninterrupted one would."""

    def __init__(self, n, batch_size, seed, start, steps):
        if n < batch_size:
            raise data.UsageError(f"--batch-size {batch_size} is larger than the {n} training images")
        self.n, self.batch_size, self.seed, self.start, self.steps = n, batch_size, seed, start, steps

    def __len__(self):
        return max(0, self.steps - self.start)

    def __iter__(self):
        per_epoch = self.n // self.batch_size
        for step in range(self.start, self.steps):
            epoch, j = divmod(step, per_epoch)
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            yield perm[j * self.batch_size:(j + 1) * self.batch_size].tolist()


def mocov3_checkpoint(model, opt, step, args):
    """MoCo-v3's format ({"state_dict": {"module.<name>": ...}}) plus what resuming needs and the ViT config."""
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    return {"state_dict": state, "vit": model.vit_cfg, "optimizer": opt.state_dict(), "step": step, "args": vars(args)}


RESUME_MUST_MATCH = ("objective", "data", "vit", "image_size", "batch_size", "mlp_dim", "dim", "seed")


def train_mocov3(args):
    """Train a ViT with the MoCo-v3 objective on the images of args.data; checkpoint (atomically) to args.out."""
    device = torch.device(args.device)
    ds = data.build_dataset(args.data, "train", args.image_size, args.data_path, args.data_dir)
    state = None
    if os.path.exists(args.out):
        if not args.resume:
            raise data.UsageError(f"{args.out} exists; pass --resume to continue it, or another --out")
        state = torch.load(args.out, map_location="cpu", weights_only=True)
        changed = [k for k in RESUME_MUST_MATCH if state["args"].get(k) != getattr(args, k)]
        if changed:
            raise data.UsageError(f"{args.out} was trained with other {', '.join('--' + k.replace('_', '-') for k in changed)}; "
                                  "use the same flags to resume, or another --out")
    cfg = encoder.VITS[args.vit]
    torch.manual_seed(args.seed)
    model = plain_attention(MoCo(cfg, args.mlp_dim, args.dim).to(device).train(), device, args.precision)
    lr = args.lr * args.batch_size / 256  # MoCo-v3's linear scaling rule
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=args.weight_decay)
    start = 0
    if state is not None:
        model.load_state_dict({k[len("module."):]: v for k, v in state["state_dict"].items()})
        opt.load_state_dict(state["optimizer"])  # after the model is on its device: the state follows the parameters
        start = state["step"]
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1)
                 for v in (encoder.IMAGENET_DEFAULT_MEAN, encoder.IMAGENET_DEFAULT_STD))
    loader = torch.utils.data.DataLoader(ds, batch_sampler=StepBatches(len(ds), args.batch_size, args.seed, start,
                                                                       args.steps), num_workers=args.workers)
    warmup = max(1, round(args.steps * 40 / 300))  # MoCo-v3 ViT: 40 warm-up epochs of 300
    size = cfg["img_size"]
    bar = tqdm(loader, initial=start, total=args.steps, desc="mocov3", dynamic_ncols=True)
    begin = time.time()
    for step, (x, _, _) in enumerate(bar, start):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, step / args.steps, lr, warmup)
        m = momentum_at(step / args.steps, args.momentum)
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([args.seed, step]).generate_state(1)[0]))
        x = x.to(device)
        views = [preprocess(augment(x, g, size, args.crop_min), size, mean, std) for _ in range(2)]  # 2 x (B, 3, S, S)
        with autocast(device, args.precision):
            loss = model(*views, m, args.temperature)
        if not torch.isfinite(loss):
            raise SystemExit(f"error: loss is {loss.item()} at step {step}; stopped. The last checkpoint is kept at "
                             f"{args.out} (lower --lr)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{opt.param_groups[0]['lr']:.1e}", m=f"{m:.4f}")
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps:
            save_atomic(mocov3_checkpoint(model, opt, step + 1, args), args.out)
    bar.close()
    if state is not None and start >= args.steps:
        print(f"{args.out} is already trained ({start} steps)")
    else:
        print(f"trained MoCo-v3 ViT-{args.vit} on {args.data} to step {args.steps} in {(time.time() - begin) / 60:.1f} min; "
              f"saved {args.out}")


# ----------------------------------------------------------------------------------------------------------------
# KNN report (paper Table 5's metric)
# ----------------------------------------------------------------------------------------------------------------

def dataset_features(enc, ds, batch_size=1024):
    """Embeddings (N, D) and labels (N,) of a whole dataset; enc is a frozen encoder, or None: the images
    themselves, flattened (N, C*H*W)."""
    feats, labels = [], []
    for x, y, _ in tqdm(torch.utils.data.DataLoader(ds, batch_size=batch_size), desc="embed", leave=False):
        feats.append(x.flatten(1).float() if enc is None else enc.embed(x))
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def make_frozen(args, weights, vit_cfg=None):
    """The frozen encoder of --objective with `weights` (a file), or None: its initialisation (seed args.seed), a ViT
    of vit_cfg for mocov3."""
    torch.manual_seed(args.seed)  # the random row is the trained run's initialisation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if args.objective == "clip":
            return encoder.Encoder(args.clip, weights, args.device)
        if weights is None:
            return encoder.MoCoV3Encoder(None, args.device, vit=vit_cfg)
        return encoder.MoCoV3Encoder(weights, args.device)


PIXEL_ROW_MAX_SIZE = 64  # px: up to here the KNN report adds a row for the flattened images (cheap at this size)


def knn_report(args, pretrained, after_training=False):
    """Print KNN (K = 20) top-1/top-5 accuracy on the test split: random weights (same seed; not with
    --no-random-row) vs `pretrained`, and for images of at most PIXEL_ROW_MAX_SIZE px the flattened pixels.
    The random row is read from <cache-dir>/knn/ when an earlier run computed it (random_row_path); the trained
    row's embeddings from --latent-cache when given. A dataset without labels is a usage error, or after
    training a note that the report is skipped."""
    train_ds = data.build_dataset(args.data, "train", args.image_size, args.data_path, args.data_dir)
    test_ds = data.build_dataset(args.data, "test", args.image_size, args.data_path, args.data_dir)
    if train_ds.num_classes == 0:
        if after_training:
            print(f"--data {args.data} has no class labels: KNN report skipped")
            return []
        raise data.UsageError(f"--data {args.data} has no class labels; KNN accuracy needs them (glyphs, class folders)")
    trained = make_frozen(args, pretrained)  # a bad weights path fails before any work
    cached = cached_embeddings(args, pretrained)  # a mismatched --latent-cache too
    keep = data.evenly_spaced(len(train_ds), min(args.knn_train, len(train_ds))) if args.knn_train else None
    path = random_row_path(args, trained, train_ds, test_ds)
    if keep is not None:  # a quick check on evenly spaced training images
        train_ds = torch.utils.data.Subset(train_ds, keep)
    if args.no_random_row:
        random_row = None
    elif path.exists():
        random_row = ("random", *json.loads(path.read_text())["top1_top5"])
        print(f"random-weights row read from {path}")
    else:
        random_row = ("random", *knn_of(make_frozen(args, None, getattr(trained, "cfg", None)), train_ds, test_ds, args.device))
        path.parent.mkdir(parents=True, exist_ok=True)
        data.atomic_write(path, lambda tmp: tmp.write_text(json.dumps({"top1_top5": random_row[1:]})))
    if cached is None:
        trained_row = ("trained", *knn_of(trained, train_ds, test_ds, args.device))
    else:
        (train_f, train_y), (test_f, test_y) = cached
        if keep is not None:
            train_f, train_y = train_f[keep], train_y[keep]
        trained_row = ("trained", *encoder.knn_accuracy(train_f, train_y, test_f, test_y, k=20, device=args.device))
    rows = [row for row in (random_row, trained_row) if row]
    if args.image_size <= PIXEL_ROW_MAX_SIZE:  # the images themselves: what any encoder's KNN is to be read against
        rows.append(("pixels", *knn_of(None, train_ds, test_ds, args.device)))
    name = args.clip if args.objective == "clip" else f"MoCo-v3 ViT {trained.cfg}"
    print(f"KNN accuracy, K=20, {len(test_ds)} held-out {args.data} vs {len(train_ds)} train ({name})")
    print(f"{'weights':<10}{'top1':>8}{'top5':>8}")
    for label, top1, top5 in rows:
        print(f"{label:<10}{top1:>8.4f}{top5:>8.4f}")
    return rows


def knn_of(enc, train_ds, test_ds, device):
    """(top-1, top-5) KNN accuracy (K = 20) of the frozen encoder ``enc`` (None: the pixels): both splits embedded,
    test against train."""
    train_f, train_y = dataset_features(enc, train_ds)
    test_f, test_y = dataset_features(enc, test_ds)
    return encoder.knn_accuracy(train_f, train_y, test_f, test_y, k=20, device=device)


def dataset_id(ds):
    """What identifies a dataset's contents: the glyph set's hash and rendering version, else its file list's hash."""
    if hasattr(ds, "set_hash"):
        return f"glyphs-{data.GLYPH_FORMAT}-{ds.set_hash}"
    return hashlib.sha1("\n".join(map(str, getattr(ds, "paths", []))).encode()).hexdigest()[:12] + f"-{len(ds)}"


def random_row_path(args, trained, train_ds, test_ds):
    """<cache-dir>/knn/random-<hash>.json: the random-weights row, keyed by everything it depends on (objective,
    architecture, seed, both splits' contents, image size, --knn-train, device type, the libraries that draw the
    initial weights), so reruns and other presets with the same encoder family reuse it."""
    arch = open_clip.get_model_config(args.clip) if args.objective == "clip" else trained.cfg
    key = json.dumps([args.objective, arch, args.seed, args.data, dataset_id(train_ds), dataset_id(test_ds),
                      args.image_size, args.knn_train, torch.device(args.device).type, torch.__version__,
                      open_clip.__version__, timm.__version__], sort_keys=True)
    return Path(args.cache_dir) / "knn" / f"random-{hashlib.sha1(key.encode()).hexdigest()[:12]}.json"


def cached_embeddings(args, pretrained):
    """((train feats (N, D), labels (N,)), (test feats, labels)) of `pretrained` from --latent-cache, or None when
    no cache is given or it was written without embeddings; a UsageError when it is the cache of other weights,
    another dataset or another image size."""
    if args.latent_cache is None:
        return None
    hier = hierarchy.Hierarchy(args.latent_cache)
    built = hier.meta["args"]
    kind = "clip" if args.objective == "clip" else "mocov3"
    same = (built["data"] == args.data and built["image_size"] == args.image_size and built["encoder"] == kind
            and (kind != "clip" or built["clip"] == args.clip)
            and os.path.abspath(str(built["pretrained"])) == os.path.abspath(str(pretrained)))
    if not same:
        raise data.UsageError(f"--latent-cache {args.latent_cache} holds the features of {built['encoder']} "
                              f"{built['pretrained']} on {built['data']} at {built['image_size']} px, not of "
                              f"{pretrained} on {args.data} at {args.image_size} px; drop --latent-cache")
    feats = {split: hier.embeddings(split) for split in ("train", "test")}
    if any(f is None for f in feats.values()):
        print(f"{args.latent_cache} holds no float32 embeddings (an older cache): embedding the dataset")
        return None
    return tuple((torch.from_numpy(np.array(feats[split])), torch.from_numpy(hier.labels(split)))
                 for split in ("train", "test"))


def main(args):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--train", action="store_true", help="train, then report KNN accuracy against random weights")
    mode.add_argument("--knn", action="store_true", help="report KNN accuracy of --pretrained vs random weights")
    p.add_argument("--objective", choices=("mocov3", "clip"), default="mocov3",
                   help="mocov3 (default): self-supervised on images alone (any dataset); clip: image/caption pairs "
                        "(glyphs, coco)")
    p.add_argument("--data", default="glyphs", help=f"dataset: {', '.join(data.DATASETS)} (default: glyphs)")
    p.add_argument("--data-path", default=None, help="root of imagenet (train/, val/) or coco")
    p.add_argument("--data-dir", default="data", help="where datasets are cached (default: data)")
    p.add_argument("--image-size", type=int, default=None,
                   help="size the images are read at (px; default: 32 for glyphs and clip, else twice the ViT input, at most "
                        "256); views are cropped from it and resampled to the encoder's input size")
    p.add_argument("--pretrained", default=None, help="--knn: weights file (or open_clip tag) to evaluate")
    p.add_argument("--out", default=None, help="--train: where to save the weights "
                                               "(default: checkpoints/glyph-clip.pt, or checkpoints/mocov3-<data>.pt)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps (default: clip 500, about 14 min on 2 free CPU cores; mocov3 2000)")
    p.add_argument("--batch-size", type=int, default=256, help="images (clip: pairs) per batch (default: 256; "
                                                               "MoCo-v3 used 4096; its lr scales with batch/256)")
    p.add_argument("--lr", type=float, default=None,
                   help="AdamW peak lr (default: clip 5e-4; mocov3 1.5e-4 per 256 images, MoCo-v3's ViT value); "
                        "warm-up then cosine decay")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default: 0.1; clip: on matrices only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, the random-weights baseline "
                                                             "and the data order (default: 0)")
    p.add_argument("--skip-knn", action="store_true", help="--train: train only, no KNN report (reproduce.py reports "
                                                           "it after the latent cache, reading its embeddings)")
    p.add_argument("--latent-cache", default=None,
                   help="--knn: a latent cache folder (hierarchy.py) of the same weights, dataset and image size: the "
                        "trained row reads its float32 whole-image embeddings instead of embedding the dataset again")
    p.add_argument("--cache-dir", default="cache", help="the random-weights row is cached in <cache-dir>/knn/ "
                                                        "(default: cache)")
    p.add_argument("--no-random-row", action="store_true", help="--knn: no random-weights row (computing it embeds "
                   "the dataset once more: a minute for the glyphs on 2 CPU cores)")
    p.add_argument("--knn-train", type=int, default=0, help="KNN against this many evenly spaced training images "
                                                            "(0: all; a quick check)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16 autocast (CUDA, or a CPU with native bf16 such as AMX; README, Speed); may change "
                        "on --resume")
    clip = p.add_argument_group("clip")
    clip.add_argument("--clip", "--name", dest="clip", default="glyph-clip",
                      help="open_clip model name (default: glyph-clip, registered by encoder.py)")
    clip.add_argument("--minutes", type=float, default=0, help="optional wall-clock cap on training in minutes (0: none); "
                                                                "the lr decay follows whichever of steps/minutes ends first")
    moco = p.add_argument_group("mocov3")
    moco.add_argument("--vit", choices=list(encoder.VITS), default="glyph",
                      help="ViT size (encoder.VITS; default: glyph = 32 px, patch 4, width 192, depth 4; "
                           "B/16 = the paper's)")
    moco.add_argument("--temperature", type=float, default=0.2, help="InfoNCE temperature τ (default: 0.2, MoCo-v3's for ViT)")
    moco.add_argument("--momentum", type=float, default=0.99, help="initial momentum m (default: 0.99), raised to 1 by a half cosine")
    moco.add_argument("--mlp-dim", type=int, default=4096, help="hidden width of the projection and prediction MLPs (default: 4096)")
    moco.add_argument("--dim", type=int, default=256, help="output width of the projection and prediction MLPs (default: 256)")
    moco.add_argument("--crop-min", type=float, default=0.08, help="smallest area fraction of the random resized crop "
                                                                           "(default: 0.08, MoCo-v3's)")
    moco.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                      help="device for training (both objectives), embedding and the KNN search (default: cuda if available)")
    moco.add_argument("--workers", type=int, default=0, help="data loader worker processes (default: 0)")
    moco.add_argument("--ckpt-every", type=int, default=100, help="steps between (atomic) checkpoints (default: 100)")
    moco.add_argument("--resume", action="store_true", help="continue the checkpoint at --out")
    args = p.parse_args(args)
    clip_run = args.objective == "clip"
    vit_size = encoder.VITS[args.vit]["img_size"]
    args.image_size = args.image_size or (32 if clip_run or args.data == "glyphs" else max(vit_size, min(256, 2 * vit_size)))
    args.steps = args.steps or (500 if clip_run else 2000)
    args.lr = args.lr or (5e-4 if clip_run else 1.5e-4)
    args.out = args.out or ("checkpoints/glyph-clip.pt" if clip_run else hierarchy.trained_encoder_path(args.data))
    if args.train:
        (train_clip if clip_run else train_mocov3)(args)
        return [] if args.skip_knn else knn_report(args, args.out, after_training=True)
    if args.pretrained is None:
        raise data.UsageError("--knn needs --pretrained PATH (e.g. checkpoints/glyph-clip.pt from --train)")
    return knn_report(args, args.pretrained)


if __name__ == "__main__":
    data.run_main(main, sys.argv[1:])
