"""Train one level of a nested diffusion model: D_θl on cached latents of real images (teacher forcing).

Paper Eq. 3 (§3.2) separates by level, so each denoiser is trained on its own (§4.1): the target is the
clean latent z_l of a real image, the conditions are the encoder latents of the SAME image at every
higher level, each corrupted as ẑ = z + σ_l ε (§3.3), all replaced by learned null tokens with
probability 10% for classifier-free guidance (§3.2). Level 1 is the image, level L the top (no latent
condition). Defaults are the paper's (U-ViT's) hyper-parameters: AdamW lr 2e-4, weight decay 0.03,
betas (0.99, 0.99), 5k warm-up steps, EMA 0.9999, scaled-linear β, T = 1000, batch 1024
(shared/paper.md §4.2).

A level's run folder is named by what it generates and what it is conditioned on (with σ), so a
depth-5 model reuses the upper levels already trained for depth 4 (§4.1, "parameter reuse").

    python train.py --level 1 --data imagenet --data-path /datasets/imagenet
    torchrun --nproc_per_node=8 train.py --level 1 --data imagenet     # DDP, same file
"""
import argparse
import contextlib
import json
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import hierarchy as H
from denoiser import SIZES, Denoiser, count_params
from diffusion import SCHEDULES, Diffusion

CONDS = ("none", "class", "text")


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
    levels = hier.levels(args.depth, image_patch(args, hier))
    k = args.depth - args.level  # position from the top
    conds = levels[:k]
    sigmas = [args.sigma[i] if args.sigma else H.sigma_for(c.grid, args.cond) for i, c in enumerate(conds)]
    return levels[k], conds, sigmas


def level_key(target, conds, sigmas, cond, model):
    """Run-folder name: what the level generates, what it is conditioned on (with σ), mode and size."""
    given = "+".join(f"{c.name}s{s:g}" for c, s in zip(conds, sigmas)) or "nothing"
    return f"{target.name}p{target.patch}-given-{given}-{cond}-{model}"


def level_meta(args, hier, target, conds, sigmas):
    """What a checkpoint records about its level: run key, shapes, σ, conditioning, size, schedule, cache."""
    return {"key": level_key(target, conds, sigmas, args.cond, args.model), "level": args.level, "depth": args.depth,
            "target": target.shape, "patch": target.patch, "target_image": target.image,
            "conds": [c.shape for c in conds], "cond_grids": [c.grid for c in conds], "sigmas": sigmas,
            "cond": args.cond, "model": args.model, "p_uncond": args.p_uncond,
            "num_classes": hier.meta["num_classes"] if args.cond == "class" else 0,
            "text_shape": None, "schedule": schedule_for(args, hier, target), "T": args.T,
            "cache": str(hier.root), "image_space": hier.meta["image_space"], "data": args.data}


def level_data(args, hier, target, conds):
    """The training split of a level: the target and its conditions (the image dataset for a pixel image level)."""
    base = data.build_dataset(args.data, "train", args.image_size, args.data_path, args.data_dir) \
        if target.image and hier.meta["image_space"] == "pixels" else None
    return H.LevelData(hier, "train", conds + [target], base, reduced=args.reduced_cache)


def build_model(meta):
    """The Denoiser described by a checkpoint's ``meta`` (also used by sample.py)."""
    return Denoiser(tuple(meta["target"]), meta["patch"], [tuple(s) for s in meta["conds"]],
                    num_classes=meta["num_classes"], text_shape=meta["text_shape"] and tuple(meta["text_shape"]),
                    size=meta["model"], p_uncond=meta["p_uncond"])


def schedule_for(args, hier, target):
    """β schedule: the paper's scaled-linear, except linear for pixel images (its √ᾱ_T ≈ 0.068 leaks signal)."""
    if args.schedule != "auto":
        return args.schedule
    return "linear" if target.image and hier.meta["image_space"] == "pixels" else "scaled_linear"


# ----------------------------------------------------------------------------------------------------
# Checkpoints, EMA, distributed helpers
# ----------------------------------------------------------------------------------------------------

def ema_decay(decay, step):
    """EMA decay at ``step``: min(decay, (1 + step) / (10 + step)), so that short runs are not dominated by the
    initial weights (0.9999 after 500 steps still keeps 95% of them); long runs use ``decay`` (paper: 0.9999)."""
    return min(decay, (1 + step) / (10 + step))


def make_optimizer(model, args, device):
    """AdamW with the paper's settings; fused (one kernel) on CUDA, torch's reference loop on the CPU."""
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=tuple(args.betas),
                             fused=True if device.type == "cuda" else None)


def serial_views(module, size=16384):
    """The parameters as flat views of at most ``size`` elements: torch runs element-wise ops on pieces below
    its parallel grain (32768) in the calling thread, so a background thread starts no OpenMP team of its own
    to compete with the training step's (and element-wise results do not depend on the split)."""
    return [v for p in module.parameters() for v in p.detach().view(-1).split(size)]


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema ← decay·ema + (1 − decay)·model for parameters (one foreach call for all of them); buffers copied."""
    e = serial_views(ema)
    torch._foreach_mul_(e, decay)
    torch._foreach_add_(e, serial_views(model), alpha=1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


class BackgroundEMA:
    """``update_ema`` run in a background thread, so that it overlaps the next step's forward and backward
    (which only read the weights); ``wait()`` before anything writes the weights (opt.step) or reads the EMA."""

    def __init__(self, ema, model):
        self.ema, self.model, self.pool, self.pending = ema, model, ThreadPoolExecutor(1, thread_name_prefix="ema"), None

    def update(self, decay):
        self.wait()
        self.pending = self.pool.submit(update_ema, self.ema, self.model, decay)

    def wait(self):
        if self.pending is not None:
            self.pending.result()
            self.pending = None


def save_checkpoint(path, obj):
    """torch.save to a temporary file, then rename: a crash mid-write keeps the previous checkpoint."""
    data.atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path):
    """A checkpoint on the CPU (never straight onto the GPU: DiT PR #36)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise data.UsageError(f"cannot read checkpoint {path} ({str(e).splitlines()[0]})") from e


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


def step_draws(args, step, rank, world, x, zs, sigmas):
    """(t, ε, σ-noised conditions, CFG dropout) of one step, drawn for the global batch from (seed, step) alone."""
    g = torch.Generator(x.device).manual_seed(int(np.random.SeedSequence([args.seed, step]).generate_state(1)[0]))
    draw = GlobalDraw(g, rank, world)  # the randomness of the global batch, this rank's rows
    t, noise = draw.randint(args.T, x), draw.randn(x)
    noisy = [H.noise_train(z, s, eps=draw.randn(z)) for z, s in zip(zs, sigmas)]
    return t, noise, noisy, draw.rand(x) < args.p_uncond


def level_loss(net, diffusion, x, t, noise, conds, y, text, drop, precision):
    """Paper Eq. 3 for one batch (forward only): ε-MSE of the denoiser given the noisy conditions."""
    amp = torch.autocast(x.device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with amp:
        return diffusion.loss(lambda xt, tt: net(xt, tt, conds, y, text, drop), x, t=t, noise=noise)


def check_args(args, hier):
    if not 1 <= args.level <= args.depth:
        raise data.UsageError(f"--level {args.level} is outside 1..{args.depth} (level 1 = image, {args.depth} = top)")
    if args.cond == "text" and not any(any(c) for c in hier.captions("train")[:100]):
        raise data.UsageError(f"--cond text needs captions, and {args.data} has none; use --cond none or class")
    if args.cond == "class" and hier.meta["num_classes"] == 0:
        raise data.UsageError(f"--cond class needs class labels, and {args.data} has none")
    if args.sigma and len(args.sigma) != args.depth - args.level:
        raise data.UsageError(f"--sigma takes {args.depth - args.level} values (one per level above {args.level})")
    if args.batch_size % args.world:
        raise data.UsageError(f"--batch-size {args.batch_size} is not divisible by the {args.world} processes")


def train(args):
    rank, world, device = setup_distributed(args.device)
    args.world = world
    H.resolve_defaults(args)
    if rank == 0:
        hier = H.build_cache(args)  # only builds what is missing
    if world > 1:
        dist.barrier()
    hier = H.build_cache(args) if rank else hier
    check_args(args, hier)
    target, conds, sigmas = level_plan(args, hier)
    meta = level_meta(args, hier, target, conds, sigmas)
    key = meta["key"]
    run = Path(args.run or f"runs/{H.data_tag(args.data)}") / key
    ckpt_path = run / "ckpt.pt"
    encoder = None
    if args.cond == "text":  # the frozen text tower runs on the fly: captions are drawn at random each step
        encoder = H.make_encoder(args, device)
        meta["text_shape"] = list(encoder.text_shape)

    start_step, state = 0, None
    if ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        for field in ("key", "cache"):  # another level, depth, σ, size or latent cache: never overwrite it
            if state["meta"][field] != meta[field]:
                raise data.UsageError(f"{ckpt_path} holds another model ({field} {state['meta'][field]}); "
                                      "use another --run-dir")
        if state["step"] >= args.steps:
            if rank == 0:
                print(f"level {args.level} ({key}) is already trained ({state['step']} steps) at {ckpt_path}: reused")
            return ckpt_path
        if not args.resume:
            raise data.UsageError(f"{ckpt_path} exists ({state['step']} steps); pass --resume to continue it, "
                                  "or use another --run-dir")
        start_step = state["step"]

    seed = args.seed * world + rank
    torch.manual_seed(seed)
    model = build_model(meta).to(device)
    ema = deepcopy(model).requires_grad_(False)
    opt = make_optimizer(model, args, device)
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        set_rng_state(state["rng"])
    diffusion = Diffusion(meta["schedule"], args.T).to(device)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    net = torch.compile(ddp) if args.compile else ddp
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    dataset = level_data(args, hier, target, conds)
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        (run / "args.json").write_text(json.dumps(vars(args), indent=1))
        (run / "meta.json").write_text(json.dumps(meta, indent=1))
        print(f"level {args.level} of {args.depth}: {target.name} given {[c.name for c in conds]} σ={sigmas} "
              f"| {args.model}, {count_params(model) / 1e6:.2f}M params | {len(dataset)} items | {run}")
    log = open(run / "log.txt", "a") if rank == 0 else None
    bar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, disable=rank != 0,
               desc=f"level {args.level}", dynamic_ncols=True)
    tick, last_loss, nan_watch = time.time(), float("nan"), NanWatch(rank, device, ckpt_path)
    ema_update = BackgroundEMA(ema, model)
    batches = H.prefetch(dataset, (batch_indices(len(dataset), args.batch_size, rank, world, args.seed, s)
                                   for s in range(start_step, args.steps)), device)  # assembled while steps run
    for step, (x, zs, y, captions) in zip(bar, batches):
        t, noise, noisy, drop = step_draws(args, step, rank, world, x, zs, sigmas)
        text = encoder.encode_text(captions) if encoder else None
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
        loss = level_loss(net, diffusion, x, t, noise, noisy, y if meta["num_classes"] else None, text, drop,
                          args.precision)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        ema_update.wait()  # the previous step's EMA reads the weights that opt.step changes
        opt.step()
        ema_update.update(ema_decay(args.ema, step))  # runs while the next batch goes forward and backward
        nan_watch.add(step, loss)
        log_now = (step + 1) % args.log_every == 0 or step + 1 == args.steps
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
        if rank == 0 and save_now:
            ema_update.wait()
            save_checkpoint(ckpt_path, {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                                        "args": vars(args), "meta": meta, "step": step + 1, "rng": rng_state()})
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        log.close()
        print(f"level {args.level}: {args.steps} steps, loss {last_loss:.4f}, checkpoint {ckpt_path}")
    return ckpt_path


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    H.add_hierarchy_args(p)
    p.add_argument("--level", type=int, required=True, help="level to train: 1 = image, --depth = top")
    p.add_argument("--depth", type=int, default=5, help="number of levels L (the paper's main model: 5)")
    p.add_argument("--cond", choices=CONDS, default="none", help="unconditional, class-conditional or text-conditional")
    p.add_argument("--model", choices=list(SIZES), default="B", help="denoiser size (B = the paper's width 768, depth 12)")
    p.add_argument("--image-patch", type=int, default=None, help="patch of the image level (default: 2 for SD-VAE, H/16 for pixels)")
    p.add_argument("--sigma", type=float, nargs="+", default=None,
                   help="σ of each condition level, top-down (default: the paper's, per --cond: "
                        "none 0,0.5,0.5,1; class 0.5,0.5,1,1; text 0.5)")
    p.add_argument("--p-uncond", type=float, default=0.1, help="probability of the null conditions (CFG)")
    p.add_argument("--schedule", choices=("auto",) + SCHEDULES, default="auto",
                   help="β schedule; auto = scaled_linear (paper), linear for pixel images")
    p.add_argument("--T", type=int, default=1000, help="diffusion steps")
    p.add_argument("--steps", type=int, default=500_000, help="training steps (paper: 500k)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=1024, help="global batch (paper: 1024)")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.03, help="AdamW weight decay")
    p.add_argument("--betas", type=float, nargs=2, default=(0.99, 0.99), help="AdamW betas (COCO: 0.9 0.9)")
    p.add_argument("--warmup", type=int, default=5000, help="linear learning-rate warm-up steps")
    p.add_argument("--ema", type=float, default=0.9999, help="EMA decay")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 autocast (CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the denoiser")
    p.add_argument("--run-dir", dest="run", default=None,
                   help="folder holding one sub-folder per trained level (default: runs/<data>)")
    p.add_argument("--resume", action="store_true", help="continue the level's checkpoint where it stopped")
    p.add_argument("--log-every", type=int, default=50, help="steps between log lines")
    p.add_argument("--ckpt-every", type=int, default=5000, help="steps between checkpoints")
    return p


if __name__ == "__main__":
    data.run_main(train, get_parser().parse_args())
