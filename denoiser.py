"""Per-level denoiser D_theta_l: a compact DiT with every higher level appended as in-context tokens.

Paper §3.2 / §4.1 (shared/paper.md §3): level l is denoised by its own transformer that sees the noisy z_l
tokens plus the tokens of ALL higher levels z_{>l} (non-Markovian), each with a learnable empty version
for classifier-free guidance (dropped with p = 0.1). Token layout (shared/paper.md §3.2, the layout that
reproduces the paper's GFLOPs; token_patch): an M x M latent grid is patchified with patch 1 when M <= 2
and patch 2 when M >= 4, so 1x1 -> 1 token, 2x2 -> 4, 4x4 -> 4, 8x8 -> 16; the image level (SD-VAE 4x32x32)
uses patch 2.

The paper used U-ViT (Bao et al. 2023: time/label as tokens, long skips). Following the project's card we
use DiT (Peebles & Xie 2023, §3.2): adaLN-Zero blocks conditioned on timestep (+ class) embedding, fixed
2-D sin-cos positions for the target tokens, zero-initialised modulation and output so a fresh model
outputs exactly zero. The latent conditions and text keep U-ViT's in-context form (learned positions).
Sizes marked ``uvit`` (XS-U, B-U) add U-ViT's long skips (Bao et al. §3: the first (depth-1)//2 blocks hand
their outputs to their mirror blocks at the end, merged by Linear(2D -> D)) and its 3x3 conv on the output.

``cond_path`` chooses how the higher latent levels enter: "tokens" (the paper's in-context tokens),
"adaln" (each level, flattened, through a linear map added to the adaLN vector c = t + Σ_l W_l z_l: DiT's
strongest scheme, Fig. 5, and RCG's pixel generator, which takes its representation as c = t + Linear(rep)),
"both", or "grid" (not in the paper: each token of a higher level, embedded, is ADDED to the target tokens
it covers, a 1×1 level to all of them, as a cascaded U-Net concatenates its low-resolution input; the
sequence keeps the target's length). Each path has its own learned null for guidance.
``text_path`` chooses how a caption enters: "tokens" (the paper's, U-ViT's in-context text tokens: the text
tower's token states) or "adaln" (not in the paper: CLIP's pooled text embedding through a linear map added to
the adaLN vector exactly as the class embedding is, as GLIDE and Imagen add a pooled text vector to the
timestep embedding; a text-conditional step then costs what a class-conditional one does).
A level's checkpoint (its weights, EMA, optimiser state and the meta describing the model) is read and
the model rebuilt here, so sampling and evaluation never import the training script.
"""
import errno
import math
import pickle
import shutil
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import data
from data import UsageError
from diffusion import guided_eps

COND_PATHS = ("tokens", "adaln", "both", "grid")  # how higher latent levels enter the denoiser (see the module docstring)
TEXT_PATHS = ("tokens", "adaln")  # how a caption enters the denoiser (see the module docstring)
CONDS = ("none", "class", "text")  # conditioning modes: unconditional, class labels, text (paper §4)

SIZES = {
    "tiny": dict(width=64, depth=2, heads=4),     # tests
    "XS": dict(width=192, depth=6, heads=3),      # laptop CPU: the glyph reproduction
    "XS+": dict(width=192, depth=7, heads=3),     # XS one block deeper: the glyph "L = 1*" baseline of depth 3 (Table 6)
    "XS++": dict(width=192, depth=8, heads=3),    # two blocks deeper: the glyph "L = 1*" baseline of depth 4
    "XS-U": dict(width=192, depth=6, heads=3, uvit=True),  # XS with U-ViT's long skips (2 in, 2 mid, 2 out) and output conv
    "S": dict(width=384, depth=12, heads=6),      # DiT-S
    "S+": dict(width=384, depth=14, heads=6),     # S two blocks deeper: the gpu preset's "L = 1*" of depth 3 (Table 6)
    "B": dict(width=768, depth=12, heads=12),     # DiT-B: the paper's width 768 and depth 12 (U-ViT "Mid")
    "B-U": dict(width=768, depth=13, heads=12, uvit=True),  # the paper's U-ViT "Mid": 6 in, 1 mid, 6 out blocks
    "L": dict(width=1024, depth=24, heads=16),    # DiT-L
    "XL": dict(width=1152, depth=28, heads=16),   # DiT-XL
}


def token_patch(grid: int) -> int:
    """Patch size of an M x M latent grid in the paper's token layout: 1 if M <= 2 else 2."""
    return 1 if grid <= 2 else 2


def patchify(x, p):
    """(B, C, H, W) -> (B, H/p * W/p, p*p*C), row-major over patches, (p, p, C) inside a patch."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, H/p, W/p, p, p, C)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x, p, C, H, W):
    """Inverse of patchify: (B, H/p * W/p, p*p*C) -> (B, C, H, W)."""
    B = x.shape[0]
    x = x.reshape(B, H // p, W // p, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, H/p, p, W/p, p)
    return x.reshape(B, C, H, W)


def sincos_2d(width, h, w):
    """Fixed 2-D sin-cos position embedding (DiT / MAE): (h*w, width), half for rows, half for columns."""
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))  # (width/4,)
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    def emb(pos):
        out = pos.reshape(-1, 1) * omega  # (h*w, width/4)
        return torch.cat([out.sin(), out.cos()], dim=1)  # (h*w, width/2)
    return torch.cat([emb(cols), emb(rows)], dim=1).float()  # (h*w, width)


def cover(z, h, w):
    """(B, g*g, D) tokens of a g x g level -> (B, h*w, D): each token repeated over the (h/g) x (w/g) block of
    the row-major h x w target tokens it covers (nearest upsampling)."""
    B, N, D = z.shape
    g = math.isqrt(N)
    z = z.reshape(B, g, 1, g, 1, D).expand(B, g, h // g, g, w // g, D)  # (B, g, h/g, g, w/g, D)
    return z.reshape(B, h * w, D)


def modulate(x, shift, scale):
    """adaLN modulation x * (1 + scale) + shift with per-sample shift/scale (B, D) on tokens (B, N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features (256 frequencies) -> MLP (DiT)."""

    def __init__(self, width, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)  # (half,)
        args = t.float()[:, None] * freqs[None]  # (B, half)
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1))  # (B, width)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection and F.scaled_dot_product_attention."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, D // self.heads)  # (B, N, 3, H, D/H)
        # strided views, no copies; unbinding before transposing makes the backward one stack into qkv's layout
        q, k, v = (z.transpose(1, 2) for z in qkv.unbind(2))  # 3 x (B, H, N, D/H)
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # torch's CPU flash kernel is slow in bf16: at the glyph image level its backward took 31 ms a block
            # against 5 ms for these two matmuls and softmax (benchmarks/bench_train.py --precision bf16)
            attn = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)  # (B, H, N, N)
            x = attn @ v  # (B, H, N, D/H)
        else:
            x = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, D/H)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block (DiT §3.2): pre-LN without affine, shift/scale/gate from the conditioning."""

    def __init__(self, width, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)  # 6 x (B, D)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))  # (B, N, D)
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))  # (B, N, D)


class FinalLayer(nn.Module):
    """adaLN + linear head from width to the p*p*C values of each target patch (DiT)."""

    def __init__(self, width, out_dim):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 x (B, D)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, p*p*C)


class Denoiser(nn.Module):
    """DiT for one level of the hierarchy (predicting eps or v), conditioned on all higher levels, class and text.

    Sequence = [target tokens | tokens of each higher level, top-down | text tokens]; only the target tokens
    reach the output head (with cond_path "grid" the higher levels are added to the target tokens instead).
    Text conditioning (COCO: the CLIP text tower's token states, shape (N_text, D_text)) enters IN CONTEXT via
    Linear(D_text -> width) + learned positions, because the paper builds on U-ViT, which treats every condition -- time, label, text tokens (uvit_t2i), and here the
    higher latent levels -- as extra tokens (paper §3.2, shared/paper.md §3.2); adaLN could only take a
    pooled text vector and lose the per-token states, and U-ViT has no cross-attention. With text_path "adaln"
    the denoiser takes that pooled vector instead (text_shape (D_text,)), added to the adaLN vector like a class.

    For classifier-free guidance every condition has a learned null: null tokens per latent level (same
    token count), the null class index num_classes, null text tokens. They are swapped in TOGETHER with one
    Bernoulli(p_uncond) per sample in training mode, or where `force_drop` is True.
    """

    def __init__(self, target_shape, patch, cond_shapes=(), num_classes=0, text_shape=None, size="tiny",
                 p_uncond=0.1, mlp_ratio=4.0, cond_path="tokens", text_path="tokens"):
        super().__init__()
        if size not in SIZES:
            raise UsageError(f"unknown denoiser size {size!r}; choose one of {', '.join(SIZES)}")
        if cond_path not in COND_PATHS:
            raise UsageError(f"unknown condition path {cond_path!r}; choose one of {', '.join(COND_PATHS)}")
        if text_path not in TEXT_PATHS:
            raise UsageError(f"unknown text path {text_path!r}; choose one of {', '.join(TEXT_PATHS)}")
        if text_shape is not None and len(text_shape) != (2 if text_path == "tokens" else 1):
            raise UsageError(f"text path {text_path} does not take text of shape {tuple(text_shape)} "
                             "(tokens: (N_text, D_text) token states; adaln: (D_text,) a pooled embedding)")
        if not 0.0 <= p_uncond <= 1.0:
            raise UsageError(f"p_uncond must be in [0, 1], got {p_uncond}")
        C, H, W = target_shape
        if H % patch or W % patch:
            raise UsageError(f"target {H}x{W} is not divisible by patch {patch}; pick a patch that divides it")
        width, depth, heads = SIZES[size]["width"], SIZES[size]["depth"], SIZES[size]["heads"]
        self.target_shape, self.patch, self.size = tuple(target_shape), patch, size
        self.cond_shapes = [tuple(s) for s in cond_shapes]
        self.num_classes, self.text_shape, self.p_uncond = num_classes, text_shape, p_uncond
        self.cond_path, self.text_path = cond_path, text_path
        self.cond_tokens, self.cond_adaln = cond_path in ("tokens", "both"), cond_path in ("adaln", "both")
        self.cond_grid = cond_path == "grid"

        self.x_embedder = nn.Linear(patch * patch * C, width)
        self.register_buffer("pos_embed", sincos_2d(width, H // patch, W // patch)[None], persistent=False)  # (1, N, D)
        self.t_embedder = TimestepEmbedder(width)
        self.cond_embedders = nn.ModuleList()
        self.cond_pos, self.cond_null = nn.ParameterList(), nn.ParameterList()
        for c, m, m2 in self.cond_shapes:
            p = token_patch(m)
            if m != m2 or m % p:
                raise UsageError(f"condition level {(c, m, m2)} must be a square grid divisible by patch {p}")
            if self.cond_grid and (H // patch % (m // p) or W // patch % (m // p)):
                raise UsageError(f"condition level {(c, m, m2)} ({m // p}x{m // p} tokens) does not tile the "
                                 f"target's {H // patch}x{W // patch} tokens; use --cond-path tokens")
            if self.cond_tokens or self.cond_grid:
                n = (m // p) ** 2
                self.cond_embedders.append(nn.Linear(p * p * c, width))
                self.cond_null.append(nn.Parameter(torch.zeros(1, n, width)))
            if self.cond_tokens:
                self.cond_pos.append(nn.Parameter(torch.zeros(1, n, width)))
        if self.cond_adaln:  # one linear map per level from the whole flattened latent to the adaLN vector
            self.cond_vec = nn.ModuleList(nn.Linear(c * m * m2, width) for c, m, m2 in self.cond_shapes)
            self.cond_vec_null = nn.Parameter(torch.zeros(len(self.cond_shapes), width))
        self.y_embedder = nn.Embedding(num_classes + 1, width) if num_classes > 0 else None  # index num_classes = null
        if text_shape is not None and text_path == "tokens":
            n_text, d_text = text_shape
            self.text_embedder = nn.Linear(d_text, width)
            self.text_pos = nn.Parameter(torch.zeros(1, n_text, width))
            self.text_null = nn.Parameter(torch.zeros(1, n_text, width))
        elif text_shape is not None:  # adaln: one pooled vector -> the adaLN vector, like y_embedder
            self.text_embedder = nn.Linear(text_shape[0], width)
            self.text_null = nn.Parameter(torch.zeros(1, width))
        self.blocks = nn.ModuleList([DiTBlock(width, heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(width, patch * patch * C)
        self.uvit = SIZES[size].get("uvit", False)
        if self.uvit:  # U-ViT (Bao et al. 2023, §3): long skips from the first (depth-1)//2 blocks to the last,
            # each merged by Linear(2D -> D) before its block, around at least one middle block; a 3x3 conv on the
            # unpatchified output
            self.skip_linears = nn.ModuleList(nn.Linear(2 * width, width) for _ in range((depth - 1) // 2))
            self.final_conv = nn.Conv2d(C, C, 3, padding=1)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT init: xavier linears, N(0, 0.02) embeddings/positions/nulls, zero adaLN, output layer and grid embedders."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        embeddings = [*self.cond_pos, *self.cond_null, self.t_embedder.mlp[0].weight, self.t_embedder.mlp[2].weight]
        if self.cond_adaln:
            embeddings.append(self.cond_vec_null)
        if self.y_embedder is not None:
            embeddings.append(self.y_embedder.weight)
        if self.text_shape is not None:
            embeddings += [self.text_pos, self.text_null] if self.text_path == "tokens" else [self.text_null]
        for p in embeddings:
            nn.init.normal_(p, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if self.uvit:  # the conv starts as the identity, so a fresh model still outputs zero
            nn.init.dirac_(self.final_conv.weight)
            nn.init.zeros_(self.final_conv.bias)
        if self.cond_grid:  # added to the target tokens: start at zero (ControlNet's zero convolution), so a
            for embed in self.cond_embedders:  # fresh model is the unconditional one and the noisy target is not drowned
                nn.init.zeros_(embed.weight)
                nn.init.zeros_(embed.bias)

    @property
    def has_conditions(self) -> bool:
        return bool(self.cond_shapes) or self.num_classes > 0 or self.text_shape is not None

    def _check_inputs(self, conds, y, text):
        if len(conds) != len(self.cond_shapes):
            raise UsageError(f"expected {len(self.cond_shapes)} condition levels, got {len(conds)}")
        if (y is None) != (self.num_classes == 0):
            raise UsageError("pass class labels y exactly when the denoiser was built with num_classes > 0")
        if (text is None) != (self.text_shape is None):
            raise UsageError("pass text token states exactly when the denoiser was built with text_shape")

    def _drop_mask(self, batch, device, force_drop):
        """(B,) bool: True where the null conditions replace the real ones."""
        if force_drop is not None:
            return force_drop.to(device=device, dtype=torch.bool)
        if self.training and self.p_uncond > 0:
            return torch.rand(batch, device=device) < self.p_uncond
        return torch.zeros(batch, dtype=torch.bool, device=device)

    def forward(self, x, t, conds=(), y=None, text=None, force_drop=None):
        """x (B, C, H, W) noisy target, t (B,) timesteps, conds: higher levels (B, C_l, M_l, M_l) top-down,
        y (B,) class ids, text (B, N_text, D_text) (text_path "adaln": (B, D_text)); returns the prediction
        (eps, or v under diffusion.py's v-prediction) (B, C, H, W)."""
        self._check_inputs(conds, y, text)
        C, H, W = self.target_shape
        B = x.shape[0]
        drop = self._drop_mask(B, x.device, force_drop)[:, None, None]  # (B, 1, 1)
        tokens = [self.x_embedder(patchify(x, self.patch)) + self.pos_embed]  # (B, N_x, D)
        for i, (z, (_, m, _)) in enumerate(zip(conds, self.cond_shapes) if self.cond_embedders else ()):
            z = torch.where(drop, self.cond_null[i], self.cond_embedders[i](patchify(z, token_patch(m))))  # (B, N_l, D)
            if self.cond_grid:
                tokens[0] = tokens[0] + cover(z, H // self.patch, W // self.patch)  # (B, N_x, D)
            else:
                tokens.append(z + self.cond_pos[i])  # (B, N_l, D)
        if text is not None and self.text_path == "tokens":
            text = self.text_embedder(text)  # (B, N_text, D)
            tokens.append(torch.where(drop, self.text_null, text) + self.text_pos)  # (B, N_text, D)
        h = torch.cat(tokens, dim=1) if len(tokens) > 1 else tokens[0]  # (B, N, D)
        c = self.t_embedder(t)  # (B, D)
        if self.cond_adaln:
            for z, vec, null in zip(conds, self.cond_vec, self.cond_vec_null):
                c = c + torch.where(drop[:, 0], null, vec(z.flatten(1)))  # (B, D)
        if y is not None:
            c = c + self.y_embedder(torch.where(drop[:, 0, 0], self.num_classes, y))  # (B, D)
        if text is not None and self.text_path == "adaln":
            c = c + torch.where(drop[:, 0], self.text_null, self.text_embedder(text))  # (B, D)
        h = self.run_blocks(h, c)  # (B, N, D)
        out = self.final_layer(h[:, : self.pos_embed.shape[1]], c)  # (B, N_x, p*p*C)
        out = unpatchify(out, self.patch, C, H, W)  # (B, C, H, W)
        return self.final_conv(out) if self.uvit else out

    def run_blocks(self, h, c):
        """The blocks on tokens h (B, N, D) with adaLN vector c (B, D); U-ViT: block i < (depth-1)//2 hands its
        output to block depth-1-i, which first merges it with its input through skip_linears."""
        if not self.uvit:
            for block in self.blocks:
                h = block(h, c)
            return h
        n, skips = len(self.skip_linears), []
        first_out = len(self.blocks) - n  # the first block that takes a skip
        for i, block in enumerate(self.blocks):
            if i >= first_out:
                h = self.skip_linears[i - first_out](torch.cat([h, skips.pop()], dim=-1))  # (B, N, D)
            h = block(h, c)  # (B, N, D)
            if i < n:
                skips.append(h)
        return h

    def forward_with_cfg(self, x, t, conds=(), y=None, text=None, w=0.0):
        """Guided eps (1 + w) eps(cond) - w eps(null) from ONE doubled batch, on all channels
        (unlike DiT's forward_with_cfg, which guides only 3 of 4 channels, DiT issue #41)."""
        if not self.has_conditions:
            return self.forward(x, t)
        two = lambda a: None if a is None else torch.cat([a, a])  # noqa: E731
        B = x.shape[0]
        force_drop = torch.arange(2 * B, device=x.device) >= B  # (2B,) first half cond, second half null
        eps = self.forward(two(x), two(t), [two(z) for z in conds], two(y), two(text), force_drop)  # (2B, C, H, W)
        eps_c, eps_u = eps.chunk(2)
        return guided_eps(eps_c, eps_u, w)


def native_bf16(device) -> bool:
    """Whether ``device`` computes bf16 natively, so that bf16 autocast is faster there: a CUDA GPU with bf16, or
    a CPU with AVX-512-BF16 / AMX (README, Speed: faster glyph training and sampling on this project's Intel
    Xeon; elsewhere bf16 on the CPU is emulated and slower). torch reports the CPU's support only through
    private helpers, so their absence reads as no."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and any(getattr(torch.cpu, f, lambda: False)()
                                        for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


# ----------------------------------------------------------------------------------------------------
# Checkpoints: a level's denoiser on disk
# ----------------------------------------------------------------------------------------------------

def build_model(meta):
    """The Denoiser described by a level's ``meta`` (meta.json of its run folder, also stored in ckpt.pt)."""
    return Denoiser(tuple(meta["target"]), meta["patch"], [tuple(s) for s in meta["conds"]],
                    num_classes=meta["num_classes"], text_shape=meta["text_shape"] and tuple(meta["text_shape"]),
                    size=meta["model"], p_uncond=meta["p_uncond"], cond_path=meta.get("cond_path", "tokens"),
                    text_path=meta.get("text_path", "tokens"))


def save_checkpoint(path, obj):
    """torch.save to a temporary file, then rename: a crash mid-write keeps the previous checkpoint. A failed
    write (torch reports a full disk as "basic_ios::clear: iostream error") is an OSError naming the file."""
    try:
        data.atomic_write(path, lambda tmp: torch.save(obj, tmp))
    except RuntimeError as e:
        free = shutil.disk_usage(Path(path).parent).free
        raise OSError(errno.ENOSPC if free < 1 << 20 else errno.EIO,
                      f"cannot write the checkpoint ({str(e).splitlines()[0]}; {free >> 20} MiB free on its disk); "
                      "the previous checkpoint is kept", str(path)) from e


def load_checkpoint(path, keys=("model", "ema", "meta", "step")):
    """A checkpoint on the CPU (never straight onto the GPU: DiT PR #36), read with weights_only (a pickle
    that would run code is refused); a UsageError naming the file if it is damaged or not one of ours."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UsageError(f"{path} holds objects other than weights and plain data ({str(e).splitlines()[0][:80]}...); "
                         "refused, since reading it could run code: use a checkpoint written by train.py") from None
    except (OSError, RuntimeError, ValueError, EOFError) as e:
        raise UsageError(f"cannot read checkpoint {path} ({str(e).splitlines()[0].split('. ')[0] if str(e) else type(e).__name__}); "
                         "it is damaged or empty: retrain the level, or restore the file") from None
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise UsageError(f"{path} is not a checkpoint of train.py (no {', '.join(missing)}); "
                         "retrain the level, or restore the file")
    return state


def load_denoiser(meta, path, use_ema=True):
    """The trained denoiser of a level (its EMA weights unless ``use_ema`` is False), on the CPU."""
    model = build_model(meta)
    try:
        model.load_state_dict(load_checkpoint(path)["ema" if use_ema else "model"])
    except RuntimeError as e:
        raise UsageError(f"{path} does not hold the model its meta.json describes ({meta['key']}: "
                         f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}); "
                         "retrain the level, or restore the file") from None
    return model


def count_params(model) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


# FlopCounterMode has no formula for the CPU flash-attention kernel that sdpa dispatches to; add it.
_CPU_SDPA_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda g, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(g, q, k, v),
}


def flop_counter() -> FlopCounterMode:
    """torch FlopCounterMode (2 FLOPs per multiply-add) that also counts CPU attention."""
    return FlopCounterMode(display=False, custom_mapping=_CPU_SDPA_FLOPS)


@torch.no_grad()
def forward_gmacs(model, x, t, **kw) -> float:
    """Forward GMACs per sample (DiT convention: 1 multiply-add = 1 FLOP, forward only)."""
    with flop_counter() as counter:
        model(x, t, **kw)
    return counter.get_total_flops() / 2 / x.shape[0] / 1e9
