"""Train one level of a nested diffusion model: D_θl on cached latents of real images (teacher forcing).

Paper Eq. 3 (§3.2) separates by level, so each denoiser is trained on its own (§4.1): the target is the
clean latent z_l of a real image, the conditions are the encoder latents of the SAME image at every
higher level, each corrupted as ẑ = z + σ_l ε (§3.3), all replaced by learned null tokens with
probability 10% for classifier-free guidance (§3.2). Level 1 is the image, level L the top (no latent
condition). Defaults are the paper's (U-ViT's) hyper-parameters: AdamW lr 2e-4, weight decay 0.03,
betas (0.99, 0.99), 5k warm-up steps, EMA 0.9999, scaled-linear β, T = 1000, batch 1024
(shared/paper.md §4.2).

A level's run folder is named by what it generates and what it is conditioned on (with σ), so a
depth-5 model reuses the upper levels already trained for depth 4 (§4.1, "parameter reuse"). Ctrl-C or
SIGTERM writes a checkpoint at the current step; --resume continues it bit for bit, and refuses any change
to what defines the model or its optimisation. One process at a time trains a run folder (a lock file).

    python train.py --level 1 --data imagenet --data-path /datasets/imagenet
    torchrun --nproc_per_node=8 train.py --level 1 --data imagenet     # DDP, same file
"""
import argparse
import contextlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import hierarchy as H
from denoiser import COND_PATHS, CONDS, SIZES, TEXT_PATHS, build_model, count_params, load_checkpoint, save_checkpoint
from diffusion import PREDICTIONS, SCHEDULES, Diffusion, check_model_guidance, skewed_timesteps

# ----------------------------------------------------------------------------------------------------
# What a level is: its levels, its name, its model
# ----------------------------------------------------------------------------------------------------

def image_patch(args, hier):
    """Patch of the image level: the paper's 2 on SD-VAE latents; 256 tokens (H/16) for pixels."""
    if args.image_patch:
        return args.image_patch
    return 2 if hier.meta["image_space"] == "sd-vae" else max(1, hier.image_shape[1] // 16)


def level_plan(args, hier):
    """(target level, condition levels top-down, σ of each condition) of level ``args.level`` of depth ``args.depth``."""
    levels = hier.levels(args.depth, image_patch(args, hier), args.top_channels)
    k = args.depth - args.level  # position from the top
    conds = levels[:k]
    sigmas = [args.sigma[i] if args.sigma else H.sigma_for(c.grid, args.cond) for i, c in enumerate(conds)]
    return levels[k], conds, sigmas


def level_key(target, conds, sigmas, cond, model, cond_path="tokens", text_path="tokens", prediction="eps",
              model_guidance=0.0):
    """Run-folder name: what the level generates, what it is conditioned on (with σ and, unless it is the
    paper's in-context tokens, the condition path), mode (with the text path unless it is the paper's), size,
    the prediction unless it is the paper's eps, and the model-guidance weight unless it is 0."""
    given = "+".join(f"{c.name}s{s:g}" for c, s in zip(conds, sigmas)) or "nothing"
    path = f"-{cond_path}" if conds and cond_path != "tokens" else ""
    mode = f"{cond}-{text_path}" if cond == "text" and text_path != "tokens" else cond
    return (f"{target.name}p{target.patch}-given-{given}{path}-{mode}-{model}" + ("" if prediction == "eps" else f"-{prediction}")
            + (f"-mg{model_guidance:g}" if model_guidance else ""))


def model_guidance(args, conds, cond):
    """The level's model-guidance weight: --model-guidance for a level with something to guide (latent
    conditions, a class or a caption), else 0, so that unconditional levels are shared with the paper's runs."""
    return args.model_guidance if conds or cond != "none" else 0.0


def level_meta(args, hier, target, conds, sigmas):
    """What a checkpoint records about its level: run key, shapes, σ, conditioning and text paths, size, schedule,
    and its cache (by name, and relative to the run folder, so the two can move together)."""
    cond_path = args.cond_path if conds else "tokens"  # the top level has no latent condition
    text_path = args.text_path if args.cond == "text" else "tokens"
    text = {"text_path": text_path} if args.cond == "text" else {}  # recorded for text runs only
    guidance = model_guidance(args, conds, args.cond)
    key = level_key(target, conds, sigmas, args.cond, args.model, cond_path, text_path, args.prediction, guidance)
    run = run_folder(args, key)
    return {"key": key, "level": args.level, "depth": args.depth, "target": target.shape, "patch": target.patch,
            "target_image": target.image, "conds": [c.shape for c in conds], "cond_grids": [c.grid for c in conds],
            "sigmas": sigmas, "cond": args.cond, "model": args.model, "p_uncond": args.p_uncond, "cond_path": cond_path,
            "prediction": args.prediction,
            "num_classes": hier.meta["num_classes"] if args.cond == "class" else 0,
            "text_shape": None, "schedule": schedule_for(args, hier, target), "T": args.T,
            "cache": hier.root.name, "cache_rel": os.path.relpath(hier.root.resolve(), run.resolve()),
            "image_space": hier.meta["image_space"], "data": args.data, **text,
            **({"model_guidance": guidance} if guidance else {}),  # recorded where it is not the paper's 0
            **({"t_skew": args.t_skew} if args.t_skew else {})}


def run_folder(args, key):
    return Path(args.run or f"runs/{H.data_tag(args.data)}") / key


def level_data(args, hier, target, conds):
    """The training split of a level: the target and its conditions (the image dataset for a pixel image level)."""
    base = data.build_dataset(args.data, "train", args.image_size, args.data_path, args.data_dir) \
        if target.image and hier.meta["image_space"] == "pixels" else None
    return H.LevelData(hier, "train", conds + [target], base, reduced=args.reduced_cache)


def schedule_for(args, hier, target):
    """β schedule: the paper's scaled-linear, except linear for pixel images (its √ᾱ_T ≈ 0.068 leaks signal)."""
    if args.schedule != "auto":
        return args.schedule
    return "linear" if target.image and hier.meta["image_space"] == "pixels" else "scaled_linear"


# ----------------------------------------------------------------------------------------------------
# Checkpoints, EMA, distributed helpers
# ----------------------------------------------------------------------------------------------------

def ema_decay(decay, step, power=8):
    """EMA decay at ``step``: min(decay, (1 + step) / (power + 2 + step)), so that short runs are not dominated by
    the initial weights (0.9999 after 500 steps still keeps 95% of them); long runs use ``decay`` (paper: 0.9999).
    Until ``decay`` binds this is the power-function EMA of Karras et al. 2024 (EDM2 §3.1): the weights after step k
    count ∝ k^power. power 8 is TensorFlow's (1 + step) / (10 + step); a lower power averages a longer tail."""
    return min(decay, (1 + step) / (power + 2 + step))


def ema_decay_since(decay, first, step, power=8):
    """The factor the every-step EMA puts on its value before step ``first`` by the end of ``step``:
    the product of ema_decay over first..step. An EMA folded in every N steps with it (``--ema-every``) keeps
    the every-step EMA's weight on everything before the window and gives the window's N steps to the latest
    weights; with N = 1 it is ema_decay itself, to the bit."""
    return math.prod(ema_decay(decay, k, power) for k in range(first, step + 1))


def make_optimizer(model, args, device):
    """AdamW with the paper's settings, fused (one kernel per tensor, one pass over memory) on CUDA and on the
    CPU (XS on this project's CPU: 4.4 ms a step against 14.2 ms for torch's default loop there)."""
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=tuple(args.betas),
                             fused=device.type in ("cuda", "cpu") or None)


def param_views(module, size=None):
    """The parameters, detached; with ``size``, as flat views of at most ``size`` elements: torch runs
    element-wise ops on pieces below its parallel grain (32768) in the calling thread, so a background thread
    starts no OpenMP team of its own to compete with the training step's (element-wise results do not depend
    on the split)."""
    params = [p.detach() for p in module.parameters()]
    return params if size is None else [v for p in params for v in p.view(-1).split(size)]


class EMAUpdate:
    """ema ← decay·ema + (1 − decay)·model = ema + (1 − decay)·(model − ema) for the parameters after each step,
    one foreach lerp over all of them (one pass over memory); buffers copied. The parameter lists are made once
    (opt.step and load_state_dict write the same tensors). On a GPU it runs in a background thread, in pieces of
    16384 elements that need no OpenMP team (see param_views), so that it overlaps the next step's forward and
    backward (which only read the weights); on the CPU a second thread only stalls the step's OpenMP team (XS,
    one-token level: 10-12 ms in the background against 2 ms inline with whole tensors), so it runs inline.
    ``wait()`` before anything writes the weights (opt.step) or reads the EMA."""

    def __init__(self, ema, model, background):
        size = 16384 if background else None
        self.ema_views, self.model_views = param_views(ema, size), param_views(model, size)
        self.buffers = list(zip(ema.buffers(), model.buffers()))
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="ema") if background else None
        self.pending = None

    @torch.no_grad()
    def apply(self, decay):
        torch._foreach_lerp_(self.ema_views, self.model_views, 1 - decay)
        for e, b in self.buffers:
            e.copy_(b)

    def update(self, decay):
        if self.pool is None:
            return self.apply(decay)
        self.wait()
        self.pending = self.pool.submit(self.apply, decay)

    def wait(self):
        if self.pending is not None:
            self.pending.result()
            self.pending = None


def rng_state():
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(),
            "python": list(random.getstate()[1]), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    np.random.set_state(("MT19937", np.array(s["numpy"], dtype=np.uint32), 624, 0, 0.0))
    random.setstate((3, tuple(s["python"]), None))
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def setup_distributed(device):
    """(rank, world size, device): one process by default, DDP when launched by torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device)
    cuda = device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device(device)


def any_rank(flag, device):
    """True on every rank when ``flag`` is True on any rank (a NaN on one rank stops all of them together
    instead of leaving the others waiting at the next all-reduce); elementwise for a tensor of flags."""
    x = torch.as_tensor(flag, dtype=torch.float32).to(device)
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return (x > 0).tolist()


class NanWatch:
    """Losses of the steps since the last check, checked together (one host-device synchronisation, one
    all-reduce) when the loop logs or saves instead of every step: the run still stops on every rank at the
    first non-finite loss, before any checkpoint after it is written."""

    def __init__(self, rank, device, ckpt_path):
        self.rank, self.device, self.ckpt_path, self.steps, self.losses = rank, device, ckpt_path, [], []

    def add(self, step, loss):
        self.steps.append(step)
        self.losses.append(loss.detach())

    def check(self):
        losses = torch.stack(self.losses)                                              # (steps since the last check,)
        bad = any_rank(~torch.isfinite(losses), self.device)
        steps, self.steps, self.losses = self.steps, [], []
        if any(bad):
            k = bad.index(True)
            raise SystemExit(f"error: loss is {losses[k].item()} on rank {self.rank} at step {steps[k]}; stopped. "
                             f"The last good checkpoint is kept at {self.ckpt_path} (lower --lr or check the data)")


def mean_over_ranks(x):
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= dist.get_world_size()
    return x


def batch_indices(n, batch, rank, world, seed, step):
    """Indices of the local batch at ``step``: epoch-wise shuffles (like DistributedSampler + set_epoch),
    computed from (seed, epoch) alone, so a resumed run sees exactly the same data."""
    per_epoch = n // batch
    if per_epoch == 0:
        raise data.UsageError(f"the dataset has {n} items, fewer than one global batch of {batch}; lower --batch-size")
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[k * batch:(k + 1) * batch][rank::world].tolist()


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------

class GlobalDraw:
    """Random draws for the whole global batch, of which each rank keeps its rows [rank::world]: a
    sample's t, ε, σ-noise and dropout do not depend on how many processes share the batch."""

    def __init__(self, generator, rank, world):
        self.g, self.rank, self.world = generator, rank, world

    def randn(self, like):
        n = len(like) * self.world
        return torch.randn((n, *like.shape[1:]), generator=self.g, device=like.device)[self.rank::self.world]

    def rand(self, like):
        return torch.rand(len(like) * self.world, generator=self.g, device=like.device)[self.rank::self.world]

    def randint(self, high, like):
        n = len(like) * self.world
        return torch.randint(0, high, (n,), generator=self.g, device=like.device)[self.rank::self.world]


def data_generator(seed, step):
    """The generator of a step's data-side draws (SD-VAE posterior samples, one caption per image), apart
    from the one for t, ε, σ-noise and dropout, so that adding them changed no other draw."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, 1]).generate_state(1)[0]))


def step_draws(args, step, rank, world, x, zs, sigmas):
    """(t, ε, σ-noised conditions, CFG dropout) of one step, drawn for the global batch from (seed, step) alone."""
    g = torch.Generator(x.device).manual_seed(int(np.random.SeedSequence([args.seed, step]).generate_state(1)[0]))
    draw = GlobalDraw(g, rank, world)  # the randomness of the global batch, this rank's rows
    t = skewed_timesteps(draw.rand(x), args.T, args.t_skew) if args.t_skew else draw.randint(args.T, x)
    noise = draw.randn(x)
    noisy = [H.noise_train(z, s, eps=draw.randn(z)) for z, s in zip(zs, sigmas)]
    return t, noise, noisy, draw.rand(x) < args.p_uncond


def level_loss(net, diffusion, x, t, noise, conds, y, text, drop, precision, guidance=0.0):
    """Paper Eq. 3 for one batch (forward only): ε-MSE (or v-MSE) of the denoiser given the noisy conditions.
    With ``guidance`` w (model guidance, Tang et al. 2025, not in the paper) the target of each row that keeps
    its conditions becomes target + w·sg(D(x_t, c) − D(x_t, ∅)): the network learns the guided prediction
    itself, which at its fixed point is classifier-free guidance of weight w / (1 − w), and samples with one
    forward a step. D(x_t, c) is this step's own prediction, D(x_t, ∅) one more forward without gradient."""
    amp = torch.autocast(x.device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    def guide(xt, tt, out):
        with torch.no_grad():
            null = net(xt, tt, conds, y, text, torch.ones_like(drop))  # every condition replaced by its null
        return guidance * torch.where(drop.view(-1, *[1] * (out.dim() - 1)), 0.0, out - null).float()

    with amp:
        return diffusion.loss(lambda xt, tt: net(xt, tt, conds, y, text, drop), x, t=t, noise=noise,
                              guide=guide if guidance else None)


def check_flags(args):
    """The checks that need no data: they run before any cache is built or model made."""
    data.check_range("--depth", args.depth, 1)
    if not 1 <= args.level <= args.depth:
        raise data.UsageError(f"--level {args.level} is outside 1..{args.depth} (level 1 = image, {args.depth} = top)")
    if args.sigma and len(args.sigma) != args.depth - args.level:
        raise data.UsageError(f"--sigma takes {args.depth - args.level} values (one per level above {args.level})")
    for flag, low in (("--steps", 1), ("--batch-size", 1), ("--log-every", 1), ("--ckpt-every", 1), ("--T", 2),
                      ("--warmup", 0), ("--weight-decay", 0), ("--ema-every", 1), ("--sigma", 0), ("--image-patch", 1),
                      ("--top-channels", 1)):
        data.check_range(flag, getattr(args, flag[2:].replace("-", "_")), low)
    data.check_range("--lr", args.lr, 0, strict=True)
    data.check_range("--p-uncond", args.p_uncond, 0, 1)
    data.check_range("--t-skew", args.t_skew, -1, strict=True)
    check_model_guidance(args.model_guidance, args.p_uncond)
    data.check_range("--ema", args.ema, 0, 1)
    data.check_range("--ema-power", args.ema_power, -1, strict=True)
    if not all(0 <= b < 1 for b in args.betas):
        raise data.UsageError(f"--betas must each be in [0, 1), got {' '.join(map(str, args.betas))}")
    H.resolve_defaults(args)


def check_args(args, hier):
    if args.cond == "text" and not any(any(c) for c in hier.captions("train")[:100]):
        raise data.UsageError(f"--cond text needs captions, and {args.data} has none; use --cond none or class")
    if args.cond == "class" and hier.meta["num_classes"] == 0:
        raise data.UsageError(f"--cond class needs class labels, and {args.data} has none")
    if args.batch_size % args.world:
        raise data.UsageError(f"--batch-size {args.batch_size} is not divisible by the {args.world} processes")


# what a resumed run may change (recorded in meta.json's "resumes"); the rest of args must match the checkpoint's,
# apart from the flags the level's key and its cache's name already pin down (level, depth, σ, patch, data, encoder)
RESUME_FREE = ("steps", "log_every", "ckpt_every", "ema_every", "device", "precision", "compile", "run", "world",
               "cache_dir", "data_dir", "data_path", "encode_batch", "workers")
RESUME_FIXED = ("seed", "lr", "weight_decay", "betas", "warmup", "ema", "ema_power", "batch_size", "t_skew")
META_FREE = ("level", "depth", "cache", "cache_rel", "resumes",  # the same level is shared by several depths
             "t_skew")  # compared as its flag, --t-skew (RESUME_FIXED)


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def cache_change(old_meta, meta):
    """"old -> new" when a checkpoint was trained on another latent cache (another encoder or data), else None."""
    old = Path(old_meta["cache"]).name
    return f"{old} -> {meta['cache']}" if old != meta["cache"] else None


def resume_changes(state, meta, args):
    """(refused, allowed): "name old -> new" for each difference between a checkpoint and this run in what
    defines the model or its optimisation (refused), and in the settings a resumed run may change (allowed)."""
    parser = get_parser()  # a fixed flag newer than the checkpoint: the checkpoint ran as its default does
    old_meta, old_args = state["meta"], {k: parser.get_default(k) for k in RESUME_FIXED} | state["args"]
    refused = [f"{k} {data.as_typed(old_meta[k])} -> {data.as_typed(meta[k])}" for k in meta
               if k in old_meta and k not in META_FREE and _plain(old_meta[k]) != _plain(meta[k])]
    cache = cache_change(old_meta, meta)
    if cache:
        refused.append(f"latent cache {cache}")
    diff = {k: [old_args[k], getattr(args, k)] for k in old_args
            if hasattr(args, k) and _plain(old_args[k]) != _plain(getattr(args, k))}
    refused += [f"--{k.replace('_', '-')} {data.as_typed(a)} -> {data.as_typed(b)}" for k, (a, b) in diff.items()
                if k in RESUME_FIXED]
    return refused, {k: v for k, v in diff.items() if k in RESUME_FREE}


def previous_state(ckpt_path, meta, args):
    """The checkpoint this run continues (None for a new level), after checking that it may: the same
    level (never overwrite another one), --resume given unless it is already trained, nothing changed that
    defines the model or its optimisation. The allowed changes are recorded in meta["resumes"]."""
    if not ckpt_path.exists():
        return None
    state = load_checkpoint(ckpt_path, ("model", "ema", "opt", "args", "meta", "step", "rng"))
    if state["meta"]["key"] != meta["key"]:  # another level, depth, σ or size: never overwrite it
        raise data.UsageError(f"{ckpt_path} holds another model (key {state['meta']['key']}); use another --run-dir")
    cache = cache_change(state["meta"], meta)
    if cache and meta["conds"]:  # conditioned on the latents of another encoder
        raise data.UsageError(f"{ckpt_path} was trained on another latent cache ({cache}); use another --run-dir")
    if state["step"] >= args.steps:
        return state
    if not args.resume:
        raise data.UsageError(f"{ckpt_path} exists ({state['step']} steps); pass --resume to continue it, "
                              "or use another --run-dir")
    refused, allowed = resume_changes(state, meta, args)
    if refused:
        raise data.UsageError(f"--resume would change how {ckpt_path} was trained: {'; '.join(refused)}; "
                              "pass the original values, or use another --run-dir for a new model")
    meta["resumes"] = state["meta"].get("resumes", []) + [{"step": state["step"], "changed": allowed}]
    return state


def trim_log(path, step):
    """Drop the log lines after ``step`` (written after the checkpoint a run resumes from) and any line cut
    short by a kill, so that log.txt holds each step once, in order."""
    if path.exists():
        text = path.read_text()
        keep = "".join(ln for ln in text.splitlines(keepends=True) if ln.endswith("\n") and _log_step(ln) <= step)
        if keep != text:
            data.atomic_write(path, lambda tmp: tmp.write_text(keep))


def _log_step(line):
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def snapshot(model, ema, opt, args, meta, step, ema_step):
    """The checkpoint after ``step`` steps: weights, EMA (holding the first ``ema_step`` steps), optimiser, args,
    meta and the RNG states."""
    return {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "ema_step": ema_step,
            "args": vars(args), "meta": meta, "step": step, "rng": rng_state()}


class StopOnSignal:
    """While training, Ctrl-C (SIGINT) or SIGTERM lets the current step finish, then ``finish`` writes a
    checkpoint at that step and exits with one line; a second signal stops at once (the previous
    checkpoint is kept). One process stops after the step the signal came in; DDP ranks agree at the
    next log step, so that they all stop after the same step."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.signum, self.armed, self.previous = None, False, {}
        if threading.current_thread() is threading.main_thread():  # only there can Python handle signals
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def _handle(self, signum, frame):
        """Before the training loop (``armed``): stop at once, as Ctrl-C does; in it: after the step."""
        self.signum = signum
        self.__exit__()
        if not self.armed:
            raise KeyboardInterrupt

    def agreed(self, device, world, log_step):
        """True when every rank is to stop after this step."""
        if world == 1:
            return self.signum is not None
        return log_step and any_rank(self.signum is not None, device)

    def finish(self, rank, world, ckpt_path, state, bar, log):
        """Checkpoint at the current step (rank 0), one line, exit code 128 + the signal."""
        signum = self.signum or signal.SIGTERM
        if rank == 0:
            save_checkpoint(ckpt_path, state)
            bar.close()
            log.close()
            print(f"error: stopped by {signal.Signals(signum).name} after step {state['step']}; checkpoint {ckpt_path}; "
                  "continue with the same command and --resume", file=sys.stderr)
        if world > 1:
            dist.barrier()
            dist.destroy_process_group()
        raise SystemExit(128 + signum)


def train(args):
    """Train one level (see the module docstring); Ctrl-C or SIGTERM stops it with a checkpoint; the level's
    run folder is locked while it trains."""
    with StopOnSignal() as stop, ExitStack() as locks:
        return train_level(args, stop, locks)


def train_level(args, stop, locks):
    check_flags(args)
    rank, world, device = setup_distributed(args.device)
    args.world = world
    if rank == 0:
        hier = H.build_cache(args)  # only builds what is missing
    if world > 1:
        dist.barrier()
    hier = H.build_cache(args) if rank else hier
    check_args(args, hier)
    target, conds, sigmas = level_plan(args, hier)
    meta = level_meta(args, hier, target, conds, sigmas)
    key = meta["key"]
    run = run_folder(args, key)
    ckpt_path = run / "ckpt.pt"
    if rank == 0:  # one writer per run folder
        locks.enter_context(data.folder_lock(run, "the run folder"))
    encoder, pooled = None, args.text_path == "adaln"  # adaln: the pooled text embedding (D,), not the token states
    if args.cond == "text":  # the frozen text tower, run once per distinct caption (Encoder.cached_text)
        encoder = H.make_text_encoder(args, device)
        meta["text_shape"] = [encoder.dim] if pooled else list(encoder.text_shape)
        meta["text_encoder"] = args.text_encoder

    state = previous_state(ckpt_path, meta, args)
    if state is not None and state["step"] >= args.steps:
        if rank == 0:
            print(f"level {args.level} ({key}) is already trained ({state['step']} steps) at {ckpt_path}: reused")
        return ckpt_path
    start_step = state["step"] if state is not None else 0
    ema_step = state.get("ema_step", start_step) if state is not None else 0  # steps the EMA holds

    torch.manual_seed(args.seed)  # the same initial weights on every rank, whatever their number
    model = build_model(meta).to(device)
    ema = deepcopy(model).requires_grad_(False)
    opt = make_optimizer(model, args, device)
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        set_rng_state(state["rng"])
    diffusion = Diffusion(meta["schedule"], args.T, args.prediction).to(device)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    net = torch.compile(ddp) if args.compile else ddp
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    dataset = level_data(args, hier, target, conds)
    if encoder:  # the caption cache: every caption of the split through the text tower once, before step 1
        encoder.cache_captions((c for caps in dataset.captions for c in caps), pooled)
    if rank == 0:  # the run folder exists: its lock is in it
        for name, obj in (("args.json", vars(args)), ("meta.json", meta)):
            data.atomic_write(run / name, lambda tmp: tmp.write_text(json.dumps(obj, indent=1)))
        trim_log(run / "log.txt", start_step)
        print(f"level {args.level} of {args.depth}: {target.name} given {[c.name for c in conds]} σ={sigmas} "
              f"| {args.model}, {count_params(model) / 1e6:.2f}M params | {len(dataset)} items | {run}")
    log = open(run / "log.txt", "a") if rank == 0 else None
    bar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, disable=rank != 0,
               desc=f"level {args.level}", dynamic_ncols=True)
    tick, last_loss, nan_watch = time.time(), float("nan"), NanWatch(rank, device, ckpt_path)
    ema_update = EMAUpdate(ema, model, background=device.type == "cuda")
    batches = H.prefetch(dataset, ((batch_indices(len(dataset), args.batch_size, rank, world, args.seed, s),
                                    GlobalDraw(data_generator(args.seed, s), rank, world))
                                   for s in range(start_step, args.steps)), device)  # assembled while steps run
    stop.armed = True  # from here a signal stops training after the current step, with a checkpoint
    for step, (x, zs, y, captions) in zip(bar, batches):
        t, noise, noisy, drop = step_draws(args, step, rank, world, x, zs, sigmas)
        text = encoder.cached_text(captions, pooled) if encoder else None
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
        loss = level_loss(net, diffusion, x, t, noise, noisy, y if meta["num_classes"] else None, text, drop,
                          args.precision, meta.get("model_guidance", 0.0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        ema_update.wait()  # the previous step's EMA reads the weights that opt.step changes
        opt.step()
        log_now = (step + 1) % args.log_every == 0 or step + 1 == args.steps
        # the EMA at multiples of N alone, so that a run continued with more --steps is the run made at once, to the
        # bit; it runs while the next batch goes forward (GPU)
        if (step + 1) % args.ema_every == 0:
            ema_update.update(ema_decay_since(args.ema, ema_step, step, args.ema_power))
            ema_step = step + 1
        nan_watch.add(step, loss)
        save_now = (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps
        if log_now or save_now:
            nan_watch.check()  # on every rank, before anything is logged or saved
        if log_now:
            last_loss = mean_over_ranks(loss.detach().clone()).item()
            rate = args.log_every / (time.time() - tick)
            tick = time.time()
            if rank == 0:
                bar.set_postfix(loss=f"{last_loss:.4f}", steps_s=f"{rate:.2f}")
                log.write(json.dumps({"step": step + 1, "loss": last_loss, "steps_per_s": rate,
                                      "lr": opt.param_groups[0]["lr"]}) + "\n")
                log.flush()
        stopping = step + 1 < args.steps and stop.agreed(device, world, log_now)
        if save_now or stopping:
            ema_update.wait()  # the checkpoint holds the EMA of ema_step steps
            if not (log_now or save_now):
                nan_watch.check()  # never checkpoint a non-finite model
            if stopping:  # writes the checkpoint itself
                stop.finish(rank, world, ckpt_path, snapshot(model, ema, opt, args, meta, step + 1, ema_step), bar, log)
            if rank == 0:
                save_checkpoint(ckpt_path, snapshot(model, ema, opt, args, meta, step + 1, ema_step))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        log.close()
        print(f"level {args.level}: {args.steps} steps, loss {last_loss:.4f}, checkpoint {ckpt_path}")
    return ckpt_path


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=data.HelpFormatter)
    H.add_hierarchy_args(p)
    p.add_argument("--level", type=int, required=True, help="level to train: 1 = image, --depth = top")
    p.add_argument("--depth", type=int, default=5, help="number of levels L (the paper's main model: 5)")
    p.add_argument("--cond", choices=CONDS, default="none", help="unconditional, class-conditional or text-conditional")
    p.add_argument("--model", choices=list(SIZES), default="B", help="denoiser size (B = the paper's width 768, depth 12)")
    p.add_argument("--cond-path", choices=COND_PATHS, default="tokens",
                   help="how higher latent levels enter the denoiser: tokens (the paper's in-context tokens), "
                        "adaln (added to the adaLN vector, DiT's strongest scheme), both, or grid (each token "
                        "added to the target tokens it covers; not in the paper)")
    p.add_argument("--text-path", choices=TEXT_PATHS, default="tokens",
                   help="--cond text: how the caption enters the denoiser: tokens (the paper's in-context text "
                        "tokens, the text tower's token states) or adaln (CLIP's pooled text embedding added to "
                        "the adaLN vector like a class; not in the paper; a step costs what a class step does)")
    p.add_argument("--image-patch", type=int, default=None, help="patch of the image level (default: 2 for SD-VAE, H/16 for pixels)")
    p.add_argument("--top-channels", type=int, default=None, help=H.TOP_CHANNELS_HELP)
    p.add_argument("--sigma", type=float, nargs="+", default=None,
                   help="σ of each condition level, top-down (default: the paper's, per --cond: "
                        "none 0,0.5,0.5,1; class 0.5,0.5,1,1; text 0.5)")
    p.add_argument("--p-uncond", type=float, default=0.1, help="probability of the null conditions (CFG)")
    p.add_argument("--t-skew", type=float, default=0.0,
                   help="training timesteps drawn with density proportional to (t/T)^k, k > -1 (0: the paper's uniform "
                        "t; k > 0 trains more on the noisy timesteps, where the conditions decide the sample, k < 0 "
                        "more on the nearly clean ones, where the drawing is finished)")
    p.add_argument("--model-guidance", type=float, default=0.0,
                   help="model guidance w in [0, 1) (Tang et al. 2025; not in the paper): each level with conditions "
                        "learns target + w·sg(D(c) − D(∅)), classifier-free guidance of weight w/(1 − w) built into "
                        "the network (0.45 ≈ the paper's 0.8), so it samples with --cfg 0 at one forward a step; "
                        "costs one more forward without gradient a training step; 0 = the paper's training")
    p.add_argument("--schedule", choices=("auto",) + SCHEDULES, default="auto",
                   help="β schedule; auto = scaled_linear (paper), linear for pixel images")
    p.add_argument("--T", type=int, default=1000, help="diffusion steps")
    p.add_argument("--prediction", choices=PREDICTIONS, default="eps",
                   help="what the network predicts: eps (the paper's) or v (weights the x0 error by 1 + SNR rather "
                        "than SNR, so high-noise steps, where the conditions matter, are learnt; not in the paper)")
    p.add_argument("--steps", type=int, default=500_000, help="training steps (paper: 500k)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=1024, help="global batch (paper: 1024)")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.03, help="AdamW weight decay")
    p.add_argument("--betas", type=float, nargs=2, default=(0.99, 0.99), help="AdamW betas (COCO: 0.9 0.9)")
    p.add_argument("--warmup", type=int, default=5000, help="linear learning-rate warm-up steps")
    p.add_argument("--ema", type=float, default=0.9999, help="EMA decay")
    p.add_argument("--ema-power", dest="ema_power", type=float, default=8.0,
                   help="until --ema binds, the EMA weighs the weights after step k ∝ k^p (decay (1 + k) / (p + 2 + k); "
                        "Karras et al. 2024's power-function EMA): 8 = TensorFlow's warm-up (1 + k) / (10 + k); lower "
                        "averages a longer tail of the run, 0 = all steps equally (> -1; not in the paper)")
    p.add_argument("--ema-every", dest="ema_every", type=int, default=8,
                   help="fold the weights into the EMA at every N-th step with the product of the N steps' decays "
                        "(1 = every step; a checkpoint's ema_step says how many steps its EMA holds). Saves N-1 of N "
                        "passes over the weights and their EMA (README, Speed); not in the paper")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 autocast (CUDA, or a CPU with native bf16 such as AMX; README, Speed)")
    p.add_argument("--compile", action="store_true", help="torch.compile the denoiser")
    p.add_argument("--run-dir", dest="run", default=None,
                   help="folder holding one sub-folder per trained level (default: runs/<data>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the level's checkpoint where it stopped (only --steps, --log-every, --ckpt-every, "
                        "--ema-every, --device, --precision, --compile and folders may change)")
    p.add_argument("--log-every", type=int, default=50, help="steps between log lines")
    p.add_argument("--ckpt-every", type=int, default=5000, help="steps between checkpoints")
    return p


if __name__ == "__main__":
    data.run_main(train, get_parser().parse_args())
